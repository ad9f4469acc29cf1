"""How a family turns clean latents into a training example: flow matching (most families), DDPM (SDXL) or EDM
(Cosmos 1.0).

Timesteps always come from the shared `TimestepSampler` as t in [0, 1] with 1 = pure noise, so sampling,
shifts, min_t/max_t and eval quantiles work the same for every family. A schedule maps t to what its denoiser
takes, noises the latents, names the target and weights each sample's loss."""
from typing import Optional

import torch
from diffusers import DDPMScheduler, EDMEulerScheduler
from diffusers.training_utils import compute_snr


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against `like`."""
    return values.view(-1, *([1] * (like.ndim - 1)))


class FlowMatching:
    """x_t = (1 - t) x + t eps; the denoiser sees t and predicts eps - x."""

    def denoiser_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _per_sample(t, latents).to(latents.dtype)
        return (1 - t) * latents + t * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def loss_weights(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        return None


class DDPM:
    """Discrete DDPM as SDXL was trained: scaled_linear betas 0.00085..0.012 over 1000 steps; t in [0, 1] picks
    the integer timestep floor(1000 t) (a uniform t gives sd-scripts' uniform integer timesteps).

    - `v_pred`: the target is v = sqrt(a) eps - sqrt(1 - a) x instead of eps, on the zero-terminal-SNR
      rescaled betas that v-prediction SDXL models (NoobAI vpred, ...) were trained with, as diffusion-pipe does;
    - `min_snr_gamma`: each sample's loss times min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v);
    - `debiased_estimation_loss`: times 1 / sqrt(SNR) (eps) or 1 / (SNR + 1) (v), SNR capped at 1000;
    both as sd-scripts, with SNR(t) = a_t / (1 - a_t) (diffusers' compute_snr), a_t the cumulative alpha of the
    schedule trained on.
    """

    def __init__(self, v_pred: bool = False, min_snr_gamma: Optional[float] = None,
                 debiased_estimation_loss: bool = False, num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012):
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                       beta_end=beta_end, beta_schedule="scaled_linear", clip_sample=False,
                                       rescale_betas_zero_snr=v_pred)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()
        self.num_train_timesteps = num_train_timesteps
        self.v_pred = v_pred
        self.min_snr_gamma = min_snr_gamma
        self.debiased_estimation_loss = debiased_estimation_loss

    def denoiser_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)

    def _signal_and_noise_scales(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alphas_cumprod.to(like.device)[self.denoiser_timesteps(t).to(like.device)]
        return _per_sample(alpha.sqrt(), like), _per_sample((1 - alpha).sqrt(), like)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._signal_and_noise_scales(t, latents)
        return (signal * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.v_pred:
            return noise
        signal, sigma = self._signal_and_noise_scales(t, latents)
        return (signal * noise.float() - sigma * latents.float()).to(latents.dtype)

    def loss_weights(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        if self.min_snr_gamma is None and not self.debiased_estimation_loss:
            return None
        snr = compute_snr(self.scheduler, self.denoiser_timesteps(t))
        weights = torch.ones_like(snr)
        if self.min_snr_gamma is not None:
            weights = weights * snr.clamp(max=self.min_snr_gamma) / (snr + 1 if self.v_pred else snr)
        if self.debiased_estimation_loss:
            capped = snr.clamp(max=1000)
            weights = weights * (1 / (capped + 1) if self.v_pred else 1 / capped.sqrt())
        return weights


class EDM:
    """EDM (Karras et al. 2022) with the preconditioning of diffusers' EDMEulerScheduler, as Cosmos 1.0 was trained
    and CosmosTextToWorldPipeline samples (sigma_data 0.5, epsilon parametrisation). t in [0, 1] picks sigma on the
    Karras schedule (rho 7) between sigma_min (t=0) and sigma_max (t=1, noise), as the scheduler spaces its steps.

    x_sigma = x + sigma eps; the denoiser sees c_in x_sigma and c_noise = log(sigma) / 4, its output F gives
    D = c_skip x_sigma + c_out F. EDM's loss lambda ||D - x||^2 with lambda = 1 / c_out^2 is exactly the unweighted
    ||F - (x - c_skip x_sigma) / c_out||^2, the target and weight used here."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0):
        self.scheduler = EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                                           sigma_schedule="karras", rho=rho, prediction_type="epsilon")

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """Karras et al.'s schedule, its ramp run from sigma_max at t=1 to sigma_min at t=0."""
        config = self.scheduler.config
        low, high = config.sigma_min ** (1 / config.rho), config.sigma_max ** (1 / config.rho)
        return (high + (1 - t.double()) * (low - high)).pow(config.rho).float()

    def denoiser_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.precondition_noise(self.sigmas(t))

    def _noised(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents.float() + _per_sample(self.sigmas(t).to(latents.device), latents) * noise.float()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = _per_sample(self.sigmas(t).to(latents.device), latents)
        return self.scheduler.precondition_inputs(self._noised(latents, noise, t), sigma).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(x - c_skip x_sigma) / c_out: c_skip x_sigma + c_out target = x (precondition_outputs, inverted)."""
        sigma = _per_sample(self.sigmas(t).to(latents.device), latents)
        noised = self._noised(latents, noise, t)
        skip = self.scheduler.precondition_outputs(noised, torch.zeros_like(noised), sigma)
        out_scale = self.scheduler.precondition_outputs(torch.zeros_like(noised), torch.ones_like(noised), sigma)
        return ((latents.float() - skip) / out_scale).to(latents.dtype)

    def loss_weights(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        return None
