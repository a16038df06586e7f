"""Registration of the package's tuner types with PEFT.

`peft.utils.register_peft_method` only accepts members of PEFT's closed `PeftType` enum, so an external method
registers by filling PEFT's lookup tables with a plain string type (accepted upstream, peft PR #2635). Those tables
are keyed by the `peft_type` string read from `adapter_config.json`. The private state-dict hooks this relies on
appeared in peft 0.21, hence the `peft>=0.21,<0.22` pin, which `check_peft_version` enforces with a clear message.
"""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

from .config import BOTTLENECK_PEFT_TYPE, C2A_PEFT_TYPE, BottleneckAdapterConfig, C2AConfig
from .model import BottleneckAdapterModel, C2AModel

SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))


def check_peft_version(installed: str | None = None) -> None:
    """Raise `ImportError` unless the installed peft is within the supported range `>=0.21,<0.22`."""
    installed_version = Version(installed or version("peft"))
    low, high = SUPPORTED_PEFT
    if not low <= installed_version < high:
        raise ImportError(
            f"peft-c2a needs peft>={low},<{high} (it plugs into PEFT's tuner state-dict hooks of that series); "
            f"found peft {installed_version}. Install a supported version: pip install 'peft>={low},<{high}'."
        )


def register_peft_types() -> None:
    """Make `"C2A"` and `"BOTTLENECK"` known to PEFT's config, tuner and prefix lookups (idempotent)."""
    check_peft_version()
    from peft import mapping

    for peft_type, config_cls, model_cls in (
        (C2A_PEFT_TYPE, C2AConfig, C2AModel),
        (BOTTLENECK_PEFT_TYPE, BottleneckAdapterConfig, BottleneckAdapterModel),
    ):
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
