"""Model zoo: importing a family module registers its models in ``MODELS``."""
from fer_jax.models.base import MODELS
from fer_jax.models import afnet  # noqa: F401
from fer_jax.models import efficientformer  # noqa: F401
from fer_jax.models import emonet  # noqa: F401
from fer_jax.models import heads  # noqa: F401
from fer_jax.models import mini_xception  # noqa: F401
from fer_jax.models import mobilefacenet  # noqa: F401
from fer_jax.models import mobilenet_v2  # noqa: F401
from fer_jax.models import resnet  # noqa: F401
from fer_jax.models import vgg  # noqa: F401


def build(name: str, **kwargs):
  """Returns the registered model ``name`` constructed with ``kwargs``."""
  return MODELS.get(name)(**kwargs)
