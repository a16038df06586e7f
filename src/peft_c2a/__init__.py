"""peft-c2a: C2A (client-customized, hypernetwork-generated adapters) and plain bottleneck adapters for PEFT.

Importing this package registers two PEFT methods under plain string types, so the usual PEFT entry points work:

    >>> import peft_c2a
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, peft_c2a.C2AConfig(num_labels=5, task_type="SEQ_CLS"))
    >>> logits = model(**batch, label_distribution=client_label_counts).logits

`PeftConfig.from_pretrained` / `PeftModel.from_pretrained` of a saved C2A or bottleneck adapter need this import first
(without it PEFT does not know the type and raises `KeyError: 'C2A'`).
"""

from .conditioning import check_client_ids, normalize_label_distribution
from .config import BOTTLENECK_PEFT_TYPE, C2A_PEFT_TYPE, BottleneckAdapterConfig, C2AConfig
from .hypernetwork import C2AHyperNetwork
from .layer import BottleneckAdapterLayer, C2ALayer, C2ALoraLayer
from .model import BottleneckAdapterModel, C2AModel
from .registration import register_peft_types

__version__ = "0.1.0"

register_peft_types()

__all__ = [
    "BOTTLENECK_PEFT_TYPE",
    "C2A_PEFT_TYPE",
    "BottleneckAdapterConfig",
    "BottleneckAdapterLayer",
    "BottleneckAdapterModel",
    "C2AConfig",
    "C2AHyperNetwork",
    "C2ALayer",
    "C2ALoraLayer",
    "C2AModel",
    "check_client_ids",
    "normalize_label_distribution",
    "register_peft_types",
]
