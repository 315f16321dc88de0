"""Host-agnostic training core (plain torch, no ComfyUI imports): LoRA with an on/off switch, an optional token [V],
reconstruction / DreamBooth prior / SuDe / PALP losses, a deterministic resumable loop, and the file formats.

- ``schedule``: :class:`~.schedule.NoiseSchedule` (alphas_cumprod + eps/x0/v parameterization), q_sample, posterior.
- ``losses``: ``reconstruction_loss``, ``prior_preservation_loss``, ``sude_loss``, ``palp_residual``, ``palp_loss``.
- ``lora``: :class:`~.lora.LoRASet` of :class:`~.lora.LoRADelta` weight functions, ``disabled()`` for the frozen base.
- ``trainer``: :class:`~.trainer.TrainConfig`, :class:`~.trainer.Trainer` over any ``denoiser(x_t, t, context)``.
- ``export``: LoRA in ComfyUI's LoraLoader key format, token embeddings, resumable states.
- ``run``: what every host that trains shares: subject images, class images cached per model, validation samples,
  the save / checkpoint / stop schedule around ``Trainer.train``.
- ``diffusers_host``: the same on a diffusers UNet + CLIP text encoder; ``cli``: the command line
  (``python training/cli.py --config run.json``, multi-GPU through ``accelerate launch``).
- ``sampling``: DDIM with classifier-free guidance (class images, validation samples).
- ``e4t``: E4T's tuning / pretraining loop (encoder head + weight offsets + optional UNet deltas), shared by the
  tuning node and the pretraining CLI; ``e4t_diffusers``: E4T on a diffusers UNet + CLIP; ``e4t_pretrain``: the
  pretraining command line (``python training/e4t_pretrain.py --config run.json``, multi-GPU through accelerate).
"""
