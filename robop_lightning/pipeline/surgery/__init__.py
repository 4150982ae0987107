"""Module surgery: shrink transformer blocks physically (fewer heads / KV groups, narrower MLPs).

A transformer block holds two *units*, each a consumer linear fed by one or more producers:

==========================  ==============================  ===============================  =============
unit                        consumer (columns removed)      producers (rows removed)         group
==========================  ==============================  ===============================  =============
timm attention              ``attn.proj``                   ``attn.qkv`` (q, k, v rows)      one head
timm MLP                    ``mlp.fc2``                     ``mlp.fc1``                      one channel
HF attention (Llama, ...)   ``self_attn.o_proj``            ``q_proj``, ``k_proj``,          one KV group
                                                            ``v_proj``                       (its q heads)
HF MLP                      ``mlp.down_proj``               ``mlp.gate_proj``, ``up_proj``   one channel
==========================  ==============================  ===============================  =============

After surgery the modules are ordinary dense ``nn.Linear`` (``num_heads`` updated, ``head_dim``
unchanged), so the model runs faster everywhere with no special kernel. Shrunk models save and
load with :func:`save_structured` / :func:`load_structured`, and Lightning checkpoints carry the
shapes (:data:`CHECKPOINT_KEY`).
"""

from robop_lightning.pipeline.surgery.common import Unit, mark_shrunk
from robop_lightning.pipeline.surgery.decoder import decoder_units, shrink_decoder_layer
from robop_lightning.pipeline.surgery.io import (
    CHECKPOINT_KEY,
    apply_structured_shapes,
    load_structured,
    record_config,
    save_structured,
    structured_shapes,
)
from robop_lightning.pipeline.surgery.units import block_units
from robop_lightning.pipeline.surgery.vit import shrink_vit_block, vit_units

__all__ = [
    "CHECKPOINT_KEY",
    "Unit",
    "apply_structured_shapes",
    "block_units",
    "decoder_units",
    "load_structured",
    "mark_shrunk",
    "record_config",
    "save_structured",
    "shrink_decoder_layer",
    "shrink_vit_block",
    "structured_shapes",
    "vit_units",
]
