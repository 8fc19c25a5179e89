"""The training fast path: cached vision features and a loss computed only where labels are.

The vision tower is frozen and the images are fixed, so its selected layer's output (the projector's
input) is computed once per image and kept in memory or in a disk-backed ``.npy`` memmap. Each
step then embeds the tokens, runs the (trainable) projector on the cached features, scatters them
into the image-token positions exactly as ``LlavaModel`` does, runs the decoder to hidden states and
applies ``lm_head`` only at positions whose next token is a label. Both shortcuts are exact; the
plain Hugging Face forward stays available (``feature_cache="off", label_only_loss=False``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from galaxy_llava.data import IGNORE_INDEX as IGNORE


def llava_parts(model) -> SimpleNamespace:
    """The pieces of a (possibly peft-wrapped) ``LlavaForConditionalGeneration`` the fast path uses."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = llava.model
    return SimpleNamespace(llava=llava, inner=inner, config=llava.config,
                           vision_tower=inner.vision_tower, projector=inner.multi_modal_projector,
                           language_model=inner.language_model,
                           embed=inner.get_input_embeddings(), lm_head=llava.lm_head)


def num_image_tokens(config) -> int:
    """Image tokens per image the language model sees (CLS dropped by the "default" strategy)."""
    vc = config.vision_config
    first = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731  (sizes may be pairs)
    n = (first(vc.image_size) // first(vc.patch_size)) ** 2
    return n if config.vision_feature_select_strategy == "default" else n + 1


class _Captured(Exception):
    """Carries the projector's input out of ``get_image_features`` (stops before the projector)."""

    def __init__(self, features):
        super().__init__()
        self.features = features


@torch.no_grad()
def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen tower's selected features [B, T, D], exactly what HF feeds the projector.

    Taken with a pre-hook on the projector during HF's own ``get_image_features``, so layer and
    CLS-selection logic cannot drift from the library's. ``no_grad``, not ``inference_mode``: the
    result is later saved for the projector's backward."""
    parts = llava_parts(model)

    def hook(_module, args):
        raise _Captured(args[0])

    handle = parts.projector.register_forward_pre_hook(hook)
    try:
        parts.inner.get_image_features(pixel_values=pixel_values)
    except _Captured as c:
        return c.features
    finally:
        handle.remove()
    raise RuntimeError("the projector was never called by get_image_features")


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                   label_only: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over label tokens (HF's shift-by-one loss).

    ``label_only`` applies ``lm_head`` only at positions whose next label is not -100: the same
    value, without the [B, L, vocab] logits (576 image tokens per galaxy carry no label)."""
    shift = labels[:, 1:]
    if label_only:
        keep = shift != IGNORE
        logits = lm_head(hidden[:, :-1][keep]).float()
        # sum / count == mean, and stays finite (0) with no label token, without a host sync
        return F.cross_entropy(logits, shift[keep], reduction="sum") / keep.sum().clamp(min=1)
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1),
                           ignore_index=IGNORE)


def gathered_lm_loss(hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                     lm_head: nn.Module) -> torch.Tensor:
    """:func:`causal_lm_loss` (label-only) from precomputed label positions: ``positions`` index
    ``hidden`` flattened to [B*L, D] (row b, position t -> b*L + t, where t+1 holds a label, in
    row-major order as the boolean mask takes them) and ``targets`` are those labels.

    The same elements in the same order, hence the same value; but no ``nonzero`` (a host sync
    per step on a GPU), because the trainer builds the positions on the host once per epoch."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = lm_head(flat.index_select(0, positions)).float()
    return F.cross_entropy(logits, targets, reduction="sum") / max(1, targets.numel())


class LlavaTrainModule(nn.Module):
    """``forward(batch) -> loss``: one module so DDP and torch.compile wrap the whole step.

    ``batch`` holds ``input_ids``, ``attention_mask``, ``labels`` and either ``features`` (cached
    tower output) or ``pixel_values``. Without features and without ``label_only`` it is the plain
    HF forward with labels."""

    def __init__(self, model, label_only_loss: bool = True, lean: bool = False):
        super().__init__()
        self.model = model
        self.label_only = label_only_loss
        self._parts = llava_parts(model)
        # The decoder's layers called directly (see lean_decoder), when checked to be identical.
        self._lean = lean and lean_decoder_matches(self._parts.language_model)

    def forward(self, input_ids, attention_mask=None, labels=None, features=None, pixel_values=None,
                image_start: int | None = None, label_positions=None, label_targets=None):
        """Mean caption-token loss. Optional shortcuts the trainer's packed batches provide, each
        exact: ``image_start`` (every row's image tokens are the span [start, start+T)): the
        projected features are concatenated in instead of ``masked_scatter``; ``label_positions``
        and ``label_targets``: see :func:`gathered_lm_loss`."""
        p = self._parts
        if features is None and not self.label_only:
            return p.llava(input_ids=input_ids, pixel_values=pixel_values,
                           attention_mask=attention_mask, labels=labels, use_cache=False).loss
        if features is None:
            features = vision_features(self.model, pixel_values)
        embeds = p.embed(input_ids)
        proj_dtype = next(p.projector.parameters()).dtype
        image = p.projector(features.to(proj_dtype)).to(embeds.dtype)
        if image_start is not None:
            end = image_start + image.shape[1]
            embeds = torch.cat([embeds[:, :image_start], image, embeds[:, end:]], dim=1)
        else:
            mask = (input_ids == p.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, image)
        if self._lean and attention_mask is None:
            hidden = lean_decoder(p.language_model, embeds)
        else:
            hidden = p.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state
        if label_positions is not None and self.label_only:
            return gathered_lm_loss(hidden, label_positions, label_targets, p.lm_head)
        return causal_lm_loss(hidden, labels, p.lm_head, self.label_only)


# ----------------------------------------------------------------- lean decoder


def lean_decoder(lm, embeds: torch.Tensor) -> torch.Tensor:
    """A Llama-style decoder's last hidden state for ``embeds`` without an attention mask: its
    rotary embedding, layers and final norm called as its own ``forward`` calls them.

    What it skips is bookkeeping that decides nothing here: building a causal mask that SDPA's
    ``is_causal`` replaces anyway, checking the positions for packed sequences (a host sync per
    step on a GPU), output capturing. :func:`lean_decoder_matches` checks the result is bitwise
    the library's before it is used."""
    pos = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    pe = lm.rotary_emb(embeds, position_ids=pos)
    hidden = embeds
    for layer in lm.layers[: lm.config.num_hidden_layers]:
        hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=pe)
    return lm.norm(hidden)


def lean_decoder_matches(lm) -> bool:
    """Whether :func:`lean_decoder` gives exactly (bitwise) the library forward's hidden states
    on a probe input; any difference or error (another architecture, a changed library) keeps
    the library forward. The global RNG is left untouched."""
    if not all(hasattr(lm, a) for a in ("rotary_emb", "layers", "norm", "config")):
        return False
    weight = next(lm.parameters())
    probe = torch.randn(2, 7, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(weight.device, weight.dtype)
    was_training = lm.training
    lm.eval()  # no dropout: both sides must see the same computation
    try:
        with torch.no_grad():
            ref = lm(inputs_embeds=probe, use_cache=False).last_hidden_state
            return bool(torch.equal(ref, lean_decoder(lm, probe)))
    except Exception:  # noqa: BLE001 - any failure means "not this architecture"
        return False
    finally:
        lm.train(was_training)


# ----------------------------------------------------------------- lean LoRA


def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA ``Linear.forward`` (one vanilla adapter, unmerged), the same sum
    ``base(x) + B(A(dropout(x))) * scaling`` with fewer passes over the activations: dropout's
    1/(1-p) and the LoRA scaling (1 in the reference's r=16, alpha=16) multiply the rank-r
    product ``A(x)`` instead of [tokens, in] / [tokens, out] tensors, and the sum is folded into
    B's matmul (``addmm``). Anything else (merged, disabled, several adapters, DoRA, biases,
    extra arguments) runs peft's own forward."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged
            or name not in self.lora_A or name in getattr(self, "lora_variant", {})
            or self.lora_A[name].bias is not None or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    drop, scale = self.lora_dropout[name], self.scaling[name]
    result = self.base_layer(x)
    if isinstance(drop, SampledDropout) and drop.training and x.device.type == "cpu":
        flat = x.contiguous().view(-1)
        x = flat.index_fill(0, drop.drop_positions(flat.numel()), 0.0).view(x.shape)
        scale = scale / (1.0 - drop.p)
    else:
        x = drop(x)
    low = F.linear(x.to(weight_a.dtype), weight_a)
    if scale != 1:
        low = low * scale
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]).to(
        result.dtype), weight_b.t().to(result.dtype))
    return out.view(result.shape)


def use_lean_lora(model, sampled_dropout: bool = True) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the lean forward (and, with
    ``sampled_dropout``, :class:`SampledDropout` for its ``nn.Dropout``); returns how many."""
    import types

    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    if sampled_dropout:
        use_sampled_lora_dropout(model)
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and "forward" not in vars(module):
            module.forward = types.MethodType(_lean_lora_forward, module)
            count += 1
    return count


# ----------------------------------------------------------------- LoRA dropout on the CPU


class SampledDropout(nn.Module):
    """Inverted dropout (keep with probability 1-p, scale by 1/(1-p)), as ``nn.Dropout``, with
    the Bernoulli mask drawn by skipping: gaps between dropped elements are Geometric(p).

    The same distribution as ``nn.Dropout``'s i.i.d. Bernoulli mask (a Bernoulli process is its
    geometric gaps), from the global torch generator (seeded, checkpointed), but ~p x the random
    draws: PyTorch's CPU ``bernoulli_`` draws serially, ~9 ns per element, which made peft's
    LoRA dropout (p=0.05) the largest op of a CPU LoRA step. Other devices use ``F.dropout``
    (their kernels are fused and fast); the masks differ from ``nn.Dropout``'s draw for draw."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 < p < 1:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p = p
        self._log_keep = math.log1p(-p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def drop_positions(self, n: int) -> torch.Tensor:
        """Sorted flat indices of the dropped elements among ``n`` (int64, CPU)."""
        parts, start = [], 0.0
        while True:
            left = (n - start) * self.p  # expected drops still to place
            m = int(left + 6 * math.sqrt(left) + 16)
            u = torch.rand(m, dtype=torch.float64)
            # Inverse CDF: 1-u is uniform on (0, 1], so each gap is >= 1 and Geometric(p).
            gaps = u.neg_().log1p_().div_(self._log_keep).floor_().add_(1)
            pos = gaps.cumsum_(0).add_(start - 1)
            parts.append(pos)
            last = float(pos[-1])
            if last >= n - 1:  # the next drop falls beyond the tensor: every drop is known
                break
            start = last + 1
        pos = parts[0] if len(parts) == 1 else torch.cat(parts)
        return pos[: int(torch.searchsorted(pos, float(n)))].long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        # contiguous (the product is): a flat index is then one element, and the draws depend
        # only on the shape, so a strided input (HF's CLS-dropped features) draws as a cached one
        out = x.contiguous() * (1.0 / (1.0 - self.p))
        out.view(-1).index_fill_(0, self.drop_positions(x.numel()), 0.0)
        return out


def use_sampled_lora_dropout(model) -> int:
    """Swap peft's LoRA ``nn.Dropout`` modules for :class:`SampledDropout` (same p); returns how
    many. A no-op for ``lora_dropout=0`` (peft then uses ``nn.Identity``)."""
    count = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for name, d in drops.items():
                if type(d) is nn.Dropout and d.p > 0:
                    drops[name] = SampledDropout(d.p).train(d.training)
                    count += 1
    return count


# ----------------------------------------------------------------- feature store

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class FeatureStore:
    """Vision features of N images, rows fetched by index: a tensor (memory) or a ``.npy`` memmap.

    bf16 rows are stored on disk as their raw 16-bit patterns (numpy has no bf16)."""

    def __init__(self, data, dtype: torch.dtype):
        self.data, self.dtype = data, dtype

    def __len__(self) -> int:
        return len(self.data)

    def get(self, index, device) -> torch.Tensor:
        """Rows ``index`` (list/tensor of ints) as a tensor on ``device``."""
        if isinstance(self.data, torch.Tensor):
            idx = torch.as_tensor(index, device=self.data.device)
            return self.data.index_select(0, idx).to(device, non_blocking=True)
        rows = np.ascontiguousarray(self.data[np.asarray(index)])
        if self.dtype == torch.bfloat16:
            rows = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        else:
            rows = torch.from_numpy(rows)
        return rows.to(device, non_blocking=True)


def cache_key(model, paths: list[str], dtype: torch.dtype, model_name: str) -> str:
    """Identity of a feature cache: model, tower weights (cheap fingerprint), images, dtype."""
    parts = llava_parts(model)
    cfg = parts.config
    with torch.no_grad():
        weights = [float(p.float().sum()) for p in parts.vision_tower.parameters()]
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    blob = json.dumps([model_name, cfg.vision_config.to_dict(), cfg.vision_feature_layer,
                       cfg.vision_feature_select_strategy, weights, files, str(dtype)],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (GPU memory, or available RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _shard(n: int, rank: int, world: int) -> range:
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def build_feature_store(model, processor, paths: list[str], *, mode: str, dtype: torch.dtype,
                        device: torch.device, batch_size: int = 32, num_workers: int = 0,
                        autocast=None, cache_dir: str | os.PathLike | None = None,
                        model_name: str = "", rank: int = 0, world: int = 1,
                        progress: bool = True) -> FeatureStore:
    """Run the frozen tower once per image (``paths``); each rank computes its share of the rows.

    ``mode="memory"`` keeps the rows on ``device``; ``"disk"`` writes ``cache_dir/features-<key>.npy``
    (reused when model, images and dtype match) and reads rows per batch."""
    import contextlib

    import torch.distributed as dist
    from tqdm.auto import tqdm

    from galaxy_llava.data import load_image

    n, t = len(paths), num_image_tokens(llava_parts(model).config)
    d = llava_parts(model).config.vision_config.hidden_size
    dd = dist.is_available() and dist.is_initialized() and world > 1
    need = n * t * d * torch.empty((), dtype=dtype).element_size()
    too_big = [mode == "memory" and cache_dir is not None and need > 0.5 * free_memory(device)]
    if dd:  # rank 0 decides for all: the disk path has collective barriers
        dist.broadcast_object_list(too_big, src=0)
    if too_big[0]:
        if progress:
            print(f"note: vision features need {need / 2**30:.1f} GiB, over half the free memory "
                  f"of {device}; caching them on disk instead")
        mode = "disk"
    final = disk = None
    if mode == "disk":
        cache_dir = Path(cache_dir)
        final = cache_dir / f"features-{cache_key(model, paths, dtype, model_name)}.npy"
        if final.is_file():
            return FeatureStore(np.load(final, mmap_mode="r"), dtype)
        tmp = cache_dir / f".{final.name}.partial"
        if rank == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(tmp, mode="w+", dtype=_NP_DTYPES[dtype], shape=(n, t, d)).flush()
        if dd:
            dist.barrier()
        disk = np.load(tmp, mmap_mode="r+")
    mine = _shard(n, rank, world)
    out = torch.zeros((len(mine), t, d), dtype=dtype, device=device) if disk is None else None

    def load(batch_paths):
        imgs = [load_image(p) for p in batch_paths]
        return processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]

    chunks = [list(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
    loader = torch.utils.data.DataLoader([[paths[i] for i in c] for c in chunks], batch_size=None,
                                         num_workers=num_workers, collate_fn=load,
                                         generator=torch.Generator())  # leave the global RNG be
    was_training = model.training
    model.eval()
    done = 0
    for chunk, pixels in zip(chunks, tqdm(loader, desc="vision features", unit="batch",
                                          disable=not progress, leave=False)):
        with autocast() if autocast else contextlib.nullcontext():
            feats = vision_features(model, pixels.to(device)).to(dtype)
        if disk is None:
            out[done:done + len(chunk)] = feats
        else:
            rows = feats.cpu()
            disk[chunk[0]:chunk[-1] + 1] = (rows.view(torch.int16).numpy().view(np.uint16)
                                            if dtype == torch.bfloat16 else rows.numpy())
        done += len(chunk)
    model.train(was_training)
    if disk is not None:
        disk.flush()
        del disk
        if dd:
            dist.barrier()
        if rank == 0:
            os.replace(tmp, final)
        if dd:
            dist.barrier()
        return FeatureStore(np.load(final, mmap_mode="r"), dtype)
    if dd:  # every rank needs every row: per-epoch shuffles draw from the whole set
        per = -(-n // world)
        padded = torch.zeros((per, t, d), dtype=dtype, device=device)
        padded[:len(mine)] = out
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out = torch.cat(gathered)[:n]
    return FeatureStore(out, dtype)
