"""Server-side aggregation: combine client updates into the next global trainable state.

An *update* is a dict `name -> tensor` holding `local_state - global_state` for every trainable tensor. Clients'
updates are summed with their example counts as weights (`UpdateAccumulator`; the sum is a flat float64 vector, so
one all-reduce combines the partial sums of several processes and the order of summation barely matters); the mean
update then goes through a server optimizer:

- `FedAvgServer`: `global += lr * mean_update` (lr 1.0 is McMahan et al.'s FedAvg; FedProx differs only on clients).
- `FedAdamServer`: the mean update is a pseudo-gradient for Adam or Yogi on the server (Reddi et al., "Adaptive
  Federated Optimization", 2021), without bias correction, as in the paper and Flower.

Everything here works on plain tensors: no model, no Trainer, no process group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch

from .arguments import FederatedTrainingArguments

TensorDict = dict[str, torch.Tensor]


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Exact size in bytes of the tensors in `state` (what is sent when the state crosses the wire)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def non_finite_tensors(update: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors in `update` that hold NaN or infinite values (empty if the update is usable)."""
    return [name for name, tensor in update.items() if not bool(torch.isfinite(tensor).all())]


class UpdateAccumulator:
    """Example-weighted sum of client updates, flattened into one float64 vector.

    Args:
        template: a state with the names, shapes and dtypes of the updates to come (e.g. the global state).
    """

    def __init__(self, template: Mapping[str, torch.Tensor], keep_updates: bool = False) -> None:
        self.names = list(template)
        self.shapes = [tuple(template[name].shape) for name in self.names]
        self.dtypes = [template[name].dtype for name in self.names]
        self.numels = [template[name].numel() for name in self.names]
        self.weighted_sum = torch.zeros(sum(self.numels), dtype=torch.float64)
        self.total_weight = 0.0
        # the robust aggregations need every update, not their sum
        self.updates: Optional[list[torch.Tensor]] = [] if keep_updates else None

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add `weight * update` (weight: the client's number of training examples)."""
        if set(update) != set(self.names):
            raise ValueError(f"Update tensors {sorted(update)} do not match the global state's {sorted(self.names)}.")
        flat = torch.cat([update[name].detach().reshape(-1).to("cpu", torch.float64) for name in self.names])
        self.weighted_sum += weight * flat
        self.total_weight += float(weight)
        if self.updates is not None:
            self.updates.append(flat)

    def mean(self) -> TensorDict:
        """The example-weighted mean update, in the original shapes and dtypes."""
        if self.total_weight <= 0:
            raise ValueError("No client update was added, so there is no mean update.")
        return self._unflatten(self.weighted_sum / self.total_weight)

    def robust_mean(self, method: str, trim_fraction: float = 0.2) -> TensorDict:
        """The coordinate-wise `"median"` or `"trimmed_mean"` of the updates (unweighted: a robust statistic must not
        let one client's claimed size decide it). Needs `keep_updates=True`."""
        if self.updates is None:
            raise ValueError("This accumulator keeps no updates (`keep_updates=False`).")
        if not self.updates:
            raise ValueError("No client update was added, so there is no mean update.")
        stacked, _ = torch.sort(torch.stack(self.updates), dim=0)
        count = stacked.shape[0]
        if method == "median":
            middle = (count - 1) // 2
            centre = stacked[middle] if count % 2 else (stacked[middle] + stacked[middle + 1]) / 2
        elif method == "trimmed_mean":
            cut = int(trim_fraction * count)
            centre = stacked[cut : count - cut].mean(dim=0)
        else:
            raise ValueError(f"Unknown robust aggregation {method!r}.")
        return self._unflatten(centre)

    def _unflatten(self, mean: torch.Tensor) -> TensorDict:
        out, offset = {}, 0
        for name, shape, dtype, numel in zip(self.names, self.shapes, self.dtypes, self.numels, strict=True):
            out[name] = mean[offset : offset + numel].reshape(shape).to(dtype)
            offset += numel
        return out


class FedAvgServer:
    """FedAvg's server step: move the global state by `learning_rate` times the mean client update."""

    def __init__(self, learning_rate: float = 1.0) -> None:
        self.learning_rate = learning_rate

    def step(self, global_state: Mapping[str, torch.Tensor], mean_update: Mapping[str, torch.Tensor]) -> TensorDict:
        """Return the next global state (new tensors; the inputs are left untouched)."""
        return {
            name: (tensor.double() + self.learning_rate * mean_update[name].double()).to(tensor.dtype)
            for name, tensor in global_state.items()
        }

    def state_dict(self) -> TensorDict:
        """Tensors to checkpoint (FedAvg keeps none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore from `state_dict()`."""
        if state:
            raise ValueError(f"FedAvg keeps no server state, but the checkpoint holds {sorted(state)[:3]} ...")

    def check_fits(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Raise `ValueError` if the state restored by `load_state_dict` cannot step `global_state`."""


class FedAdamServer(FedAvgServer):
    """Adaptive server optimizers FedAdam and FedYogi (Reddi et al. 2021).

    With `delta` the mean client update: `m = b1 m + (1 - b1) delta`; Adam: `v = b2 v + (1 - b2) delta^2`; Yogi:
    `v = v - (1 - b2) delta^2 sign(v - delta^2)`; then `global += lr * m / (sqrt(v) + tau)`. `m` starts at 0 and
    `v` at `tau^2`, as in the paper.
    """

    def __init__(
        self, learning_rate: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, yogi: bool = False
    ) -> None:
        super().__init__(learning_rate)
        self.beta1, self.beta2, self.tau, self.yogi = beta1, beta2, tau, yogi
        self.first_moment: TensorDict = {}
        self.second_moment: TensorDict = {}

    def step(self, global_state: Mapping[str, torch.Tensor], mean_update: Mapping[str, torch.Tensor]) -> TensorDict:
        """Return the next global state and advance the moment estimates."""
        new_state = {}
        for name, tensor in global_state.items():
            delta = mean_update[name].double()
            m = self.first_moment.get(name, torch.zeros_like(delta))
            v = self.second_moment.get(name, torch.full_like(delta, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * delta
            squared = delta * delta
            if self.yogi:
                v = v - (1 - self.beta2) * squared * torch.sign(v - squared)
            else:
                v = self.beta2 * v + (1 - self.beta2) * squared
            self.first_moment[name], self.second_moment[name] = m, v
            new_state[name] = (tensor.double() + self.learning_rate * m / (v.sqrt() + self.tau)).to(tensor.dtype)
        return new_state

    def state_dict(self) -> TensorDict:
        """The moment estimates, keyed `m/<name>` and `v/<name>`."""
        state = {f"m/{name}": value for name, value in self.first_moment.items()}
        state.update({f"v/{name}": value for name, value in self.second_moment.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the moment estimates from `state_dict()`."""
        self.first_moment = {key[2:]: value.double() for key, value in state.items() if key.startswith("m/")}
        self.second_moment = {key[2:]: value.double() for key, value in state.items() if key.startswith("v/")}
        if len(self.first_moment) + len(self.second_moment) != len(state):
            raise ValueError("Server optimizer state holds keys other than `m/...` and `v/...`.")

    def check_fits(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Raise `ValueError` unless the moments are absent (before the first step) or cover exactly the tensors of
        `global_state`, with their shapes, finite, the second moment non-negative (its square root divides)."""
        if not self.first_moment and not self.second_moment:
            return
        for kind, moments in (("m", self.first_moment), ("v", self.second_moment)):
            if set(moments) != set(global_state):
                raise ValueError(f"its `{kind}/...` tensors are not those of the global state")
            for name, value in moments.items():
                expected = tuple(global_state[name].shape)
                if tuple(value.shape) != expected:
                    raise ValueError(f"{kind}/{name} has shape {tuple(value.shape)}, the global state {expected}")
                if not bool(torch.isfinite(value).all()) or (kind == "v" and bool((value < 0).any())):
                    raise ValueError(f"{kind}/{name} holds non-finite{' or negative' if kind == 'v' else ''} values")


def make_server_optimizer(args: FederatedTrainingArguments) -> FedAvgServer:
    """The server optimizer that `args.aggregation` names."""
    learning_rate = args.effective_server_learning_rate
    if args.aggregation in ("fedadam", "fedyogi"):
        return FedAdamServer(
            learning_rate, args.server_beta1, args.server_beta2, args.server_tau, yogi=args.aggregation == "fedyogi"
        )
    return FedAvgServer(learning_rate)


def clip_to_norm(update: Mapping[str, torch.Tensor], limit: Optional[float]) -> TensorDict:
    """`update` scaled down to L2 norm `limit` (over all its tensors) when it is longer; as it is otherwise."""
    if limit is None:
        return dict(update)
    norm = math.sqrt(sum(float(tensor.double().pow(2).sum()) for tensor in update.values()))
    if norm <= limit:
        return dict(update)
    scale = limit / norm
    return {name: (tensor.double() * scale).to(tensor.dtype) for name, tensor in update.items()}


def capped_shares(weights: Mapping[str, float], cap: float) -> dict[str, float]:
    """`weights` as shares of their total, none above `cap`: the excess of a capped share is spread over the
    others in proportion to their weights (water-filling). If the cap cannot hold (`cap * n < 1`), equal shares."""
    if cap * len(weights) < 1.0:
        return dict.fromkeys(weights, 1.0 / len(weights))
    capped: set[str] = set()
    while True:
        free = {name: weight for name, weight in weights.items() if name not in capped}
        left = 1.0 - cap * len(capped)
        total = sum(free.values())
        shares = {name: left * weight / total for name, weight in free.items()} if total > 0 else {}
        over = {name for name, share in shares.items() if share > cap}
        if not over:
            return {**shares, **dict.fromkeys(capped, cap)}
        capped |= over
