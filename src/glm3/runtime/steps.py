"""The compiled steps of inference: prompt prefill and one-token decode, over a static or a paged KV cache.

Each is a Cell over the model's transformer calling one of its named entry points (glm3.modeling.model.ChatGLMModel),
so it compiles into one graph, runs eagerly, or exports to MindIR (glm3.deploy.export) as it is. The caches are
graph inputs and outputs, never hidden state; a model with the CPU kernels of the paged cache writes the block
caches it is given in place, and its paged steps return the logits only (nothing is copied). Host-side
bookkeeping (which cache columns or blocks are in use) is the KV-cache manager's and the model runners'.
`compiled_step` keeps each model's steps, built once.
"""

from __future__ import annotations

import weakref

import mindspore as ms
from mindspore import nn, ops

from glm3 import kernels
from glm3.modeling.model import GLM3ForCausalLM, positions_and_mask


class PrefillStep(nn.Cell):
    """(input_ids [b, s], attention_mask [b, s]) -> (last-position logits [b, V], caches padded to max_len:
    2 x layers tensors [b, groups, max_len, d])."""

    def __init__(self, model: GLM3ForCausalLM, max_len: int):
        super().__init__(auto_prefix=False)  # share the model's parameters under their own names
        self.transformer = model.transformer
        self.max_len = max_len

    def construct(self, input_ids, attention_mask):
        seq_len = input_ids.shape[1]
        positions, keep = positions_and_mask(attention_mask, seq_len)
        logits, kv = self.transformer.prefill(input_ids, positions, keep)
        caches = ()
        for t in kv:
            caches = caches + (ops.pad(t, (0, 0, 0, self.max_len - seq_len)),)
        return logits, caches


class DecodeStep(nn.Cell):
    """(input_ids [b, 1], position_ids [b, 1], key_mask [b, max_len], write_index, caches) -> (logits [b, V],
    caches): attends to every valid cache column and writes its own key/value at write_index."""

    def __init__(self, model: GLM3ForCausalLM, max_len: int):
        super().__init__(auto_prefix=False)
        self.transformer = model.transformer
        self.max_len = max_len

    def construct(self, input_ids, position_ids, key_mask, write_index, caches):
        b = input_ids.shape[0]
        write_mask = (ops.arange(self.max_len, dtype=ms.int32) == write_index).reshape(1, 1, self.max_len, 1)
        keep = key_mask.reshape(b, 1, 1, self.max_len)
        return self.transformer.decode_static(input_ids, position_ids, keep, caches, write_mask)


class PagedPrefillStep(nn.Cell):
    """(input_ids [b, s], attention_mask [b, s], slot_mapping [b, s], caches) -> (last logits [b, V], caches),
    or the logits only when the model writes the caches in place (GLM3ForCausalLM.paged_kernels).

    Attention within the prompt is the ordinary causal one; the prompt's keys and values are then written
    into the block caches at their slots (padding positions point at a scratch slot)."""

    def __init__(self, model: GLM3ForCausalLM):
        super().__init__(auto_prefix=False)
        self.transformer = model.transformer
        self.groups, self.head_dim = model.config.num_kv_groups, model.config.kv_channels
        self.in_place = model.paged_kernels

    def construct(self, input_ids, attention_mask, slot_mapping, caches):
        positions, keep = positions_and_mask(attention_mask, input_ids.shape[1])
        logits, kv = self.transformer.prefill(input_ids, positions, keep)
        slots = slot_mapping.reshape(-1)
        new_caches = ()
        for cache, t in zip(caches, kv):
            rows = t.transpose(0, 2, 1, 3).reshape(-1, self.groups, self.head_dim)
            if self.in_place is not None:
                new_caches = new_caches + (self.in_place.write(cache, rows, slots),)
            else:
                new_caches = new_caches + (kernels.write_cache(cache, rows, slots),)
        if self.in_place is not None:
            return ops.depend(logits, new_caches)
        return logits, new_caches


class PagedDecodeStep(nn.Cell):
    """(input_ids [b, 1], position_ids [b, 1], slots [b], block_tables [b, max_blocks], context_lens [b], caches)
    -> (logits [b, V], caches), or the logits only when the model writes the caches in place.
    fused_paged_attention: MindSpore's PagedAttention operator (MindSpore Lite on
    Ascend only; see glm3.kernels.paged_attention)."""

    def __init__(self, model: GLM3ForCausalLM, fused_paged_attention: bool = False):
        super().__init__(auto_prefix=False)
        self.transformer = model.transformer
        self.fused_paged_attention = fused_paged_attention
        self.in_place = model.paged_kernels is not None and not fused_paged_attention

    def construct(self, input_ids, position_ids, slots, block_tables, context_lens, caches):
        logits, caches = self.transformer.decode_paged(
            input_ids, position_ids, caches, slots, block_tables, context_lens, self.fused_paged_attention
        )
        if self.in_place:
            return ops.depend(logits, caches)
        return logits, caches


def _signature(value):
    """Shapes and dtypes of a step's arguments (tensors, or tuples of them): what selects its compiled graph."""
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return (tuple(value.shape), value.dtype)


class PerShapeStep:
    """A step called through MindSpore's inference fast path: one Cell per input signature (from `make`), each
    of phase "increment", which MindSpore runs straight from its compiled graph after its first call
    (Cell._predict) instead of deriving the compile key from every argument again (about 1 ms of Python a
    decoding step: a sixth of a 4-bit bench-shape step). The fast path keeps one graph per Cell, hence a Cell
    per signature (a decoding width, a block-table width); they share the model's parameters."""

    def __init__(self, make):
        self.make, self.cells = make, {}
        self.spare = make()  # the next signature's cell; its attributes (e.g. in_place) are every cell's

    def __getattr__(self, name):
        spare = self.__dict__.get("spare")
        if spare is None:
            raise AttributeError(name)
        return getattr(spare, name)

    def __call__(self, *args):
        key = _signature(args)
        cell = self.cells.get(key)
        if cell is None:
            cell, self.spare = self.spare, self.make()
            cell.phase = "increment"
            self.cells[key] = cell
        return cell(*args)


# model -> {(structure_version, kind, max_len): step}: a model's compiled steps, owned here, not by the model.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_STEP_KINDS = {
    "prefill": lambda model, max_len: PrefillStep(model, max_len),
    "decode": lambda model, max_len: PerShapeStep(lambda: DecodeStep(model, max_len)),
    "paged_prefill": lambda model, max_len: PagedPrefillStep(model),
    "paged_decode": lambda model, max_len: PerShapeStep(lambda: PagedDecodeStep(model)),
}


def compiled_step(model, kind: str, max_len: int = 0):
    """The model's step of `kind` ("prefill"/"decode" for a static cache of `max_len` positions,
    "paged_prefill"/"paged_decode" for block caches), built once and reused (graph mode compiles it at its first
    call with each new input shape). Steps of an older structure of the model (before LoRA was added or
    merged: GLM3ForCausalLM.structure_changed) are dropped."""
    steps = _STEPS.setdefault(model, {})
    key = (model.structure_version, kind, max_len)
    if key not in steps:
        for stale in [k for k in steps if k[0] != model.structure_version]:
            del steps[stale]
        steps[key] = _STEP_KINDS[kind](model, max_len)
    return steps[key]
