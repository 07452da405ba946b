"""Safe-MM-DPO: margin-scaled DPO (MM-DPO) on a helpful and a harmless stream, joined by a Lagrange multiplier.

MM-DPO (MM-RLHF, Zhang et al. 2025, arXiv 2502.10391, Sec. 4, "dynamic reward scaling") gives each pair its
own beta, larger when a reward model is confident the chosen response is better (margin delta):

    beta(delta) = beta_ori * (1 + w * (1 - exp(-k * max(delta, 0))))        in [beta_ori, (1 + w) * beta_ori]

The harmless side follows Safe RLHF (Dai et al. 2023, arXiv 2310.12773, Eq. 9-10): maximise helpfulness subject
to an expected cost below a threshold d, solved as min_theta max_{lambda >= 0} L_help + lambda * L_safe with
the loss normalised by (1 + lambda) so its scale does not grow with lambda, and lambda updated by dual ascent on
(J_c - d). Here J_c is estimated from harmless pairs as the policy's implied probability of choosing each response
times that response's cost (``expected_cost_pairwise``).
The harmless stream keeps Safe RLHF's subscript in the code: ``h_safe``, ``beta_safe``, ``L_safe``.

Sign conventions: h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], y_w the preferred (more
helpful / safer) response; h > 0 means the policy already ranks the pair correctly. Cost > 0 means unsafe.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from humanalign.losses.preference import pair_accuracy


def margin_scaled_beta(delta: torch.Tensor, beta_ori: float = 0.1, w: float = 0.5, k: float = 0.5) -> torch.Tensor:
    """MM-DPO per-pair beta (arXiv 2502.10391, dynamic reward scaling): (B,) -> (B,), detached.

    ``delta`` is the reward-model margin r(y_w) - r(y_l); a negative margin (the reward model disagrees with the
    label) is clamped to 0 and gets the base beta. beta grows from beta_ori to at most (1 + w) * beta_ori.
    """
    delta = delta.detach().clamp(min=0)
    return beta_ori * (1 + w * (1 - torch.exp(-k * delta)))


def _stream_loss(h: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """-log sigmoid(beta * h) per pair (B,): the DPO sigmoid loss with a per-pair beta."""
    return -F.logsigmoid(beta * h)


def safe_mm_dpo_loss(
    h_help: torch.Tensor,
    h_safe: torch.Tensor,
    beta_help: torch.Tensor | float,
    beta_safe: torch.Tensor | float,
    lam: float | torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coeff: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Safe-MM-DPO objective; returns (scalar loss, detached metrics).

    L_help = mean_i -log s(beta_help_i * h_help_i)        over the helpful pairs  h_help (B,)
    L_safe = mean_j -log s(beta_safe_j * h_safe_j)        over the harmless pairs   h_safe (B2,)
    L      = (L_help + lam * L_safe) / (1 + lam) + kl_coeff * mean(kl)

    ``lam`` (>= 0) is the Lagrange multiplier; it is treated as a constant (detached), it moves by dual ascent
    (``update_lambda`` / ``LambdaState``), not by this loss's gradient. ``kl`` is an optional extra KL estimate
    (scalar or per example) whose mean is added with ``kl_coeff``.
    An empty stream contributes nothing: with no harmless pairs (B2 = 0) the loss is plain MM-DPO, L = L_help;
    with no helpful pairs it is lam * L_safe / (1 + lam), the harmless share of a mixed batch. Both empty is an
    error. Returns a 0-dim tensor (already reduced) because the two streams have different batch sizes.
    """
    if h_help.numel() == 0 and h_safe.numel() == 0:
        raise ValueError("safe_mm_dpo_loss needs at least one helpful or harmless pair")
    lam_value = lam.detach().to(h_help.device, h_help.dtype) if isinstance(lam, torch.Tensor) else float(lam)
    if float(lam_value) < 0:
        raise ValueError(f"the Lagrange multiplier must be >= 0, got {float(lam_value)}")
    # per-pair betas are constants of the loss (MM-DPO computes them from a frozen reward model)
    beta_help = beta_help.detach() if isinstance(beta_help, torch.Tensor) else beta_help
    beta_safe = beta_safe.detach() if isinstance(beta_safe, torch.Tensor) else beta_safe
    ref = h_help if h_help.numel() else h_safe
    zero = ref.new_zeros(())

    has_help, has_safe = h_help.numel() > 0, h_safe.numel() > 0
    loss_help = _stream_loss(h_help, beta_help).mean() if has_help else zero  # ()
    loss_safe = _stream_loss(h_safe, beta_safe).mean() if has_safe else zero  # ()
    if has_safe:
        total = (loss_help + lam_value * loss_safe) / (1 + lam_value)
    else:
        total = loss_help
    loss_kl = kl.mean() if kl is not None else zero
    if kl_coeff:
        total = total + kl_coeff * loss_kl

    def _mean(x: torch.Tensor | float, count: int) -> torch.Tensor:
        """Detached float mean of a per-pair tensor (or a float beta); 0 for an empty stream."""
        if count == 0:
            return torch.zeros((), device=ref.device)
        if isinstance(x, torch.Tensor):
            return x.detach().float().mean()
        return torch.tensor(float(x), device=ref.device)

    n_help, n_safe = h_help.numel(), h_safe.numel()
    # the run-book's metric names (public output, logged as-is): the harmless stream appears as "safety"
    metrics = {
        "loss_helpful": loss_help.detach(),
        "loss_safety": loss_safe.detach(),
        "loss_kl": loss_kl.detach(),
        # implicit accuracy: the policy ranks the pair correctly relative to the reference (h > 0; h == 0, as
        # before any training, is a tie and counts one half)
        "accuracy_helpful": _mean(pair_accuracy(h_help), n_help),
        "accuracy_safety": _mean(pair_accuracy(h_safe), n_safe),
        # implicit reward margin beta * h of each stream (DPO's rewards/margins)
        "reward_margin_helpful": _mean(beta_help * h_help, n_help),
        "reward_margin_safety": _mean(beta_safe * h_safe, n_safe),
        "beta_helpful": _mean(beta_help, n_help),
        "beta_safety": _mean(beta_safe, n_safe),
        "lambda": torch.tensor(float(lam_value), device=ref.device),
    }
    return total, metrics


def expected_cost_pairwise(
    h_safe: torch.Tensor,
    beta_safe: torch.Tensor | float,
    cost_chosen: torch.Tensor,
    cost_rejected: torch.Tensor,
) -> torch.Tensor:
    """Expected cost of the policy on harmless pairs, J_c per pair (B2,).

    p = sigmoid(beta_safe * h_safe) is the Bradley-Terry probability, implied by the policy's implicit reward,
    that it picks y_w (the safer response) over y_l; J = p * C(y_w) + (1 - p) * C(y_l) with C the cost-model
    score (cost > 0 means unsafe). J falls as the policy shifts mass to the safer response. Not detached, so a
    caller may differentiate it; detach before logging or passing to the lambda update.
    """
    p = torch.sigmoid(beta_safe * h_safe)  # (B2,)
    return p * cost_chosen + (1 - p) * cost_rejected


def update_lambda(
    lam: float,
    expected_cost: float | torch.Tensor,
    *,
    threshold: float = 0.0,
    lr: float,
    lam_max: float | None,
) -> float:
    """One projected dual-ascent step (Safe RLHF Eq. 10): lam <- clamp(lam + lr * (J_c - d), 0, lam_max).

    lambda rises while the expected cost J_c exceeds the threshold d (the constraint is violated) and falls
    toward 0 once it is satisfied. ``expected_cost`` may be a tensor; its mean is used. ``lam_max=None``: no cap.
    """
    if isinstance(expected_cost, torch.Tensor):
        j = expected_cost.detach().float().mean().item()
    else:
        j = float(expected_cost)
    upper = math.inf if lam_max is None else lam_max
    return min(max(lam + lr * (j - threshold), 0.0), upper)


class LambdaState:
    """The Lagrange multiplier of Safe-MM-DPO with its cost window; checkpointable as plain JSON.

    ``observe(costs)`` appends per-pair expected costs to a sliding window (the last ``window_size`` values);
    ``maybe_update(step)`` does one dual-ascent step with the window's mean when step >= delay_steps and
    (step - delay_steps) % update_interval == 0, at most once per step (safe to call on every micro-batch).
    ``state_dict`` holds the multiplier, the window and the counters, all plain Python; the hyperparameters
    come from the run's config, so a resumed run may change them.
    """

    def __init__(
        self,
        init: float = 1.0,
        lr: float = 0.01,
        lam_max: float | None = 10.0,
        threshold: float = 0.0,
        update_interval: int = 1,
        delay_steps: int = 0,
        window_size: int = 64,
    ):
        self.lam_max = math.inf if lam_max is None else float(lam_max)
        if not 0 <= init <= self.lam_max:
            raise ValueError(f"lambda init {init} must lie in [0, lam_max={lam_max}]")
        if update_interval < 1 or window_size < 1 or delay_steps < 0:
            raise ValueError("update_interval and window_size must be >= 1 and delay_steps >= 0")
        self.lr, self.threshold = lr, threshold
        self.update_interval, self.delay_steps = update_interval, delay_steps
        self.window: deque[float] = deque(maxlen=window_size)
        self.last_update_step = -1
        self.num_updates = 0
        self._set_value(float(init))

    # the multiplier; PPOLagLambda stores it in log space
    def _set_value(self, value: float) -> None:
        self.value = value

    def _ascend(self, cost: float) -> None:
        self.value = update_lambda(self.value, cost, threshold=self.threshold, lr=self.lr, lam_max=self.lam_max)

    def observe(self, costs: torch.Tensor | Iterable[float] | float) -> None:
        """Add costs (a tensor of any shape, an iterable or one number) to the window."""
        if isinstance(costs, torch.Tensor):
            self.window.extend(costs.detach().float().flatten().tolist())
        elif isinstance(costs, (int, float)):
            self.window.append(float(costs))
        else:
            self.window.extend(float(c) for c in costs)

    @property
    def window_mean(self) -> float | None:
        return sum(self.window) / len(self.window) if self.window else None

    def due(self, step: int) -> bool:
        """Whether ``step`` is an update step (delay and interval honoured, not already done)."""
        return (
            step >= self.delay_steps
            and (step - self.delay_steps) % self.update_interval == 0
            and step != self.last_update_step
        )

    def maybe_update(self, step: int) -> bool:
        """Update lambda if ``step`` is due and the window holds costs; returns whether it did."""
        if not self.due(step) or not self.window:
            return False
        self._ascend(self.window_mean)
        self.last_update_step = step
        self.num_updates += 1
        return True

    def state_dict(self) -> dict:
        return {
            "value": self.value,
            "window": list(self.window),
            "last_update_step": self.last_update_step,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        value = float(state["value"])
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"lambda state holds an invalid value {value}")
        self._set_value(min(value, self.lam_max))
        self.window.clear()
        self.window.extend(float(c) for c in state.get("window", []))
        self.last_update_step = int(state.get("last_update_step", -1))
        self.num_updates = int(state.get("num_updates", 0))
