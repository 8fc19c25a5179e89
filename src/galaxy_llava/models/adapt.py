"""What trains: the vision encoder frozen; LoRA on the language model and the projector (or the
projector trained whole); QLoRA's 4-bit base. Module names come from the model's family."""

from __future__ import annotations

from galaxy_llava.errors import UserError
from galaxy_llava.models.registry import family_for
from galaxy_llava.models.loading import quiet_peft

PROJECTOR_MODES = ("lora", "full")


def freeze_vision_encoder(model) -> None:
    """Stop gradients into the vision encoder: 1.8k galaxies would only erode its features."""
    for p in family_for(model).encoder_parameters(model):
        p.requires_grad_(False)


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05, projector: str = "lora",
               target_modules: str | list[str] | None = None):
    """Wrap ``model`` in peft LoRA on the language model's attention and MLP linears and the
    projector; never the vision encoder.

    The projector is LoRA-adapted by default (``projector="lora"``): the caption grammar carries
    ~20 attribute values, a low-rank change of what reaches the decoder, and the adapter stays
    small. ``projector="full"`` trains it whole (peft ``modules_to_save``) for a randomly
    initialised or badly mismatched projector. The reference's ``mm_projector`` target matched
    nothing (DESIGN.md, defect 1). ``target_modules`` overrides the family's choice."""
    from peft import LoraConfig, get_peft_model

    if projector not in PROJECTOR_MODES:
        raise UserError(f"projector must be one of {', '.join(PROJECTOR_MODES)}, not {projector!r}")
    family = family_for(model)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=target_modules or family.lora_target_modules(projector),
        modules_to_save=family.projector_module_names() if projector == "full" else None)
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    freeze_vision_encoder(peft_model)
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def qlora_config(family):
    """The 4-bit NF4 quantisation of QLoRA (bf16 compute); the family's vision encoder, projector
    and output head stay in full precision. A one-line error where there is no CUDA GPU or no
    bitsandbytes."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); this "
                        "machine has none: use --method lora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--method qlora needs bitsandbytes: pip install 'galaxy-llava[qlora]'"
                        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16,
                              llm_int8_skip_modules=family.unquantized_modules())
