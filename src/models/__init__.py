"""Model code of our own, for families whose denoiser is not in diffusers (OmniGen2, ...): one package per family,
`src/models/<family>/`, with module names equal to the native checkpoint's keys so that weights load and LoRAs
export (`diffusion_model.<native name>`) without a key map. Nothing here needs a diffusers mixin: the family module
injects LoRA with peft's `inject_adapter_in_model` and checkpoints activations over its `block_lists` (see
src/modules/base.py; tests/test_family_contract.py trains such a model)."""
