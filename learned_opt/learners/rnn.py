"""A black-box recurrent meta-learner: an RNN reads the support set, a head reads its state."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import Batch, Task, uniform_init
from .base import MetaLearner, refuse_running_statistics

__all__ = ["RNNLearner", "RNNState"]

_CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}
_HEADS = ("mlp", "bilinear", "distance")
_PAIRS = ("concat", "outer", "outer-mean")


@dataclass
class RNNState:
    """Inner state of a recurrent learner.

    Attributes:
        h: the RNN's hidden state, shape ``(1, 1, hidden)`` (layers, batch, units).
        c: the LSTM's cell state (same shape), ``None`` for a GRU.
        step: support batches read so far.
    """

    h: Tensor
    c: Tensor | None
    step: int = 0


class RNNLearner(MetaLearner):
    """Learning as sequence modelling (Hochreiter et al., 2001; Santoro et al., 2016).

    An LSTM (or GRU) reads the support pairs ``(f(x), y)`` one per time step, with ``y`` one-hot
    for classification (integer targets) and raw for regression (float targets), and ``f`` an
    optional learned encoder (identity by default). Its final hidden state ``h`` plays the role of
    phi: a head maps ``(h, f(x))`` to a prediction for any query input ``x``. theta is the
    encoder's, the RNN's and the head's weights; the task's own model and parameters are not used,
    only its ``loss_fn``, so one learner serves every family with the same input and output sizes.

    Heads:

    - ``"mlp"``: an MLP on ``concat[h, f(x)]``;
    - ``"bilinear"``: ``W(h) f(x) + b(h)`` with ``W(h)`` (``y_dim x features``) and ``b(h)``
      linear in ``h``. The prediction is a learned similarity between the query's features and
      what the RNN stored about the support set, which an MLP on a concatenation must
      approximate; with one-hot labels gating its input, an LSTM can write each class's features
      into its own units, and the bilinear read-out compares a query against them;
    - ``"distance"``: ``logit_c = -||f(x) - W_c(h)||^2 + b_c(h)`` (up to a term that is the same
      for every class), with ``W(h)`` and ``b(h)`` linear in ``h`` as above: the query is compared
      with what the RNN stored for each class by distance, as prototypical networks do, so a
      common component of the features (which a dot product rewards in every class) cancels.

    :meth:`step` reads one whole support batch (continuing from the current hidden state) and
    returns the head's loss on that batch; :meth:`evaluate` scores the head on a query batch.
    Use ``horizon=1`` in :func:`~learned_opt.outer.unroll.unroll` to read the support set once.

    Args:
        x_dim: input features (flattened).
        y_dim: classes (classification) or target features (regression); the head's outputs.
        hidden: RNN units.
        head_hidden: hidden width of the head MLP (``head="mlp"``).
        cell: ``"lstm"`` or ``"gru"``.
        head: ``"mlp"``, ``"bilinear"`` or ``"distance"``.
        pairs: how a support pair becomes the RNN's input: ``"concat"``, ``[f(x), y]``; or
            ``"outer"``, ``[f(x), y, y (x) f(x)]`` with the outer product flattened. With one-hot
            labels the outer product puts each class's features into their own input slots, so an
            additive recurrent update can keep per-class sums of the features (prototypes) for the
            bilinear head to compare a query against; with ``"concat"`` the RNN must discover
            that binding through its gates, a long plateau at chance accuracy; or
            ``"outer-mean"``, the same with the outer product divided by the number of support
            pairs of that label in the batch (classification only), so that per-class sums are
            per-class means: the accumulated values keep one scale whatever K is, where sums
            of K examples saturate the cell's tanh (on 5-way 10-shot MNIST the ``"outer"``
            learner collapsed to one class).
        encoder: a module mapping flattened inputs ``(n, x_dim)`` to features ``(n, d)``; the
            learner holds a copy of it (the module given is not changed), its weights
            re-initialized from ``seed`` (PyTorch's default layer scheme). Batch norm in it must
            use batch statistics (``track_running_stats=False``).
        feature_norm: if given, the features are layer-normalized (zero mean and unit variance
            over the features of each input, no learned affine) and multiplied by this number:
            the accumulator's tanh then stays near its linear range, and a component common to
            every input (a random conv encoder's features have cosine ~0.98 between any two
            digits) is removed.
        rnn_lr_scale: the meta learning rate of the RNN's weights relative to the rest of theta
            (see :meth:`meta_param_groups`). Adam moves every entry of a matrix by about the
            learning rate, so a large recurrent matrix changes by much more in norm than a
            small one; at 1e-3 the accumulator's 160-unit LSTM left its structure within a few
            meta-steps on 50-step support sequences (5-way 10-shot) and never returned, at
            3e-5 (scale 0.03) the encoder and head learn and the LSTM keeps accumulating.
        seed: seed of the weight initialization.
        gate_bias: initial bias of the input, forget and output gates with
            ``init="accumulator"``: the forget gate keeps ``sigmoid(gate_bias)`` of the cell per
            support pair (4: 0.982, so the first of 50 pairs keeps 40% of its weight; 6: 0.9975,
            88%).
        init: ``"default"`` (PyTorch's scheme for every weight) or ``"accumulator"`` (LSTM,
            ``"outer"`` or ``"outer-mean"`` pairs, ``"bilinear"`` or ``"distance"`` head,
            ``hidden >= y_dim * d``): the RNN starts as a per-class feature accumulator and the
            head as a read-out of it. The gates start open (input, output) and closed to
            forgetting (biases +``gate_bias``), the cell input of unit ``c * d + j`` reads the
            outer-product slot of class ``c``, feature ``j``, and nothing else (otherwise the
            noise of its other weights accumulates over the support sequence, while a class's
            mean does not grow; units beyond the slots start with no cell input), and the head
            maps that unit to the weight of feature ``j`` in class ``c``'s logit; the gates' and
            head's other weights start at a tenth of the default scheme. At initialization the
            learner is then a nearest-prototype classifier on the encoder's features, which
            meta-training refines, instead of having to discover that binding from noise: on
            5-way 1-shot MNIST the default scheme stayed at 0.35 accuracy after 4,000
            meta-steps, the accumulator start reached 0.44-0.47.
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        hidden: int = 64,
        *,
        head_hidden: int = 64,
        cell: str = "lstm",
        head: str = "mlp",
        pairs: str = "concat",
        encoder: nn.Module | None = None,
        feature_norm: float | None = None,
        rnn_lr_scale: float = 1.0,
        seed: int = 0,
        init: str = "default",
        gate_bias: float = 4.0,
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"Unknown cell {cell!r}; expected one of {sorted(_CELLS)}")
        if head not in _HEADS:
            raise ValueError(f"Unknown head {head!r}; expected one of {_HEADS}")
        if pairs not in _PAIRS:
            raise ValueError(f"Unknown pairs encoding {pairs!r}; expected one of {_PAIRS}")
        if init not in ("default", "accumulator"):
            raise ValueError(f"Unknown init {init!r}; expected 'default' or 'accumulator'")
        if min(x_dim, y_dim, hidden, head_hidden) < 1:
            raise ValueError(f"Invalid sizes: x_dim={x_dim}, y_dim={y_dim}, hidden={hidden}")
        if feature_norm is not None and not feature_norm > 0:
            raise ValueError(f"Invalid feature_norm: {feature_norm} (must be > 0 or None)")
        if not rnn_lr_scale > 0:
            raise ValueError(f"Invalid rnn_lr_scale: {rnn_lr_scale} (must be > 0)")
        self.feature_norm, self.rnn_lr_scale = feature_norm, rnn_lr_scale
        self.gate_bias = gate_bias
        self.x_dim, self.y_dim, self.hidden, self.cell = x_dim, y_dim, hidden, cell
        self.head_kind = head
        self.pairs = pairs
        f_dim = x_dim
        if encoder is not None:
            refuse_running_statistics(encoder, "The encoder")
            encoder = copy.deepcopy(encoder)  # its own: the caller's module is left as it is
            with torch.no_grad():
                f_dim = int(encoder(torch.zeros(2, x_dim)).shape[-1])  # (2: batch norm)
        self.f_dim = f_dim
        # Built on the meta device, so nothing is drawn from the global RNG (reset_parameters
        # initializes the weights from an explicit generator).
        meta = "meta"
        in_dim = f_dim + y_dim + (0 if pairs == "concat" else y_dim * f_dim)
        self.rnn = _CELLS[cell](in_dim, hidden, batch_first=True, device=meta)
        if head == "mlp":
            self.head: nn.Module = nn.Sequential(
                nn.Linear(hidden + f_dim, head_hidden, device=meta),
                nn.ReLU(),
                nn.Linear(head_hidden, y_dim, device=meta),
            )
        else:  # bilinear or distance: W(h) (y_dim x f_dim) and b(h) (y_dim)
            self.head = nn.Linear(hidden, y_dim * (f_dim + 1), device=meta)
        self.to_empty(device="cpu")
        self.encoder = encoder  # attached after to_empty: its device is the caller's
        self.init = init
        if init == "accumulator" and (
            cell != "lstm" or pairs == "concat" or head == "mlp" or hidden < y_dim * f_dim
        ):
            raise ValueError(
                "init='accumulator' needs cell='lstm', pairs='outer' or 'outer-mean', "
                "head='bilinear' or "
                "'distance', and "
                f"hidden >= y_dim * features = {y_dim * f_dim} (got {cell!r}, {pairs!r}, "
                f"{head!r}, hidden={hidden})"
            )
        self.reset_parameters(torch.Generator().manual_seed(seed))

    def settings(self) -> dict[str, Any]:
        return {
            "cell": self.cell, "head": self.head_kind, "pairs": self.pairs,
            "feature_norm": self.feature_norm, "rnn_lr_scale": self.rnn_lr_scale,
        }  # fmt: skip

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default initialization (U(-1/sqrt(fan), 1/sqrt(fan))), from ``generator``;
        then, with ``init="accumulator"``, the accumulator structure (see the class)."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.hidden)
            for p in self.rnn.parameters():
                p.uniform_(-bound, bound, generator=generator)
            for module in (self.head, self.encoder):
                if module is None:
                    continue
                fresh = uniform_init(module, generator)
                for name, p in module.named_parameters():
                    p.copy_(fresh[name])
            if self.init == "accumulator":
                self._accumulator_init()

    def _accumulator_init(self) -> None:
        H, d, k = self.hidden, self.f_dim, self.y_dim
        slots = torch.arange(k * d)
        rnn = self.rnn
        for p in (*rnn.parameters(), *self.head.parameters()):
            p.mul_(0.1)
        for name in ("bias_ih_l0", "bias_hh_l0"):
            getattr(rnn, name).zero_()
        b = rnn.bias_ih_l0
        b[:H] = b[H : 2 * H] = b[3 * H :] = self.gate_bias  # i, f, o open; g (cell input) at 0
        # cell input of unit s = the outer-product slot s (class s // d, feature s % d), only;
        # the units beyond the slots start with no cell input at all
        rnn.weight_ih_l0[2 * H : 3 * H].zero_()
        rnn.weight_hh_l0[2 * H : 3 * H].zero_()
        rnn.weight_ih_l0[2 * H + slots, d + k + slots] = 1.0
        # head: unit s -> the weight of feature s % d in the logit of class s // d
        rows = (slots // d) * (d + 1) + slots % d
        self.head.weight[rows, slots] = 1.0

    def features(self, x: Tensor) -> Tensor:
        """``f(x)`` for flattened inputs."""
        f = x.reshape(len(x), -1) if len(x) else x
        if len(f) == 0 or f[0].numel() != self.x_dim:
            raise ValueError(
                f"Inputs of shape {tuple(x.shape)}: expected a non-empty batch of "
                f"x_dim={self.x_dim} features each (after flattening)"
            )
        if self.encoder is not None:
            f = self.encoder(f)
        if self.feature_norm is not None:
            f = F.layer_norm(f, f.shape[-1:]) * self.feature_norm
        return f

    def _targets(self, y: Tensor, like: Tensor) -> Tensor:
        """The RNN's view of the targets: one-hot labels or raw values, ``(n, y_dim)``."""
        if not y.is_floating_point():
            return F.one_hot(y.long(), self.y_dim).to(like.dtype)
        if self.pairs == "outer-mean":
            raise ValueError("pairs='outer-mean' needs class labels (integer targets)")
        y = y.reshape(len(y), -1).to(like.dtype)
        if y.shape[1] != self.y_dim:
            raise ValueError(f"Targets have {y.shape[1]} features, expected y_dim={self.y_dim}")
        return y

    def _pairs(self, f: Tensor, y: Tensor) -> Tensor:
        if self.pairs == "concat":
            return torch.cat((f, y), dim=1)
        outer = y.unsqueeze(2) * f.unsqueeze(1)
        if self.pairs == "outer-mean":  # one-hot y: its column sums count each label's pairs
            outer = outer / y.sum(0).clamp_min(1.0)[None, :, None]
        return torch.cat((f, y, outer.flatten(1)), dim=1)

    def predict(self, state: RNNState, x: Tensor) -> Tensor:
        """The head's prediction for inputs ``x`` given the state's hidden vector."""
        return self._head(state, self.features(x))

    def _head(self, state: RNNState, f: Tensor) -> Tensor:
        if self.head_kind == "mlp":
            h = state.h[-1].expand(len(f), -1)
            return self.head(torch.cat((h, f), dim=1))
        wb = self.head(state.h[-1, 0]).view(self.y_dim, self.f_dim + 1)
        w, b = wb[:, :-1], wb[:, -1]
        if self.head_kind == "distance":  # -||f - w_c||^2 + b_c without the common -||f||^2
            return 2.0 * f @ w.T - (w * w).sum(1) + b
        return f @ w.T + b

    def init_state(self, task: Task, generator: torch.Generator) -> RNNState:
        """Zero hidden (and cell) state (``generator`` is unused)."""
        p = next(self.rnn.parameters())
        h = torch.zeros(1, 1, self.hidden, dtype=p.dtype, device=p.device)
        return RNNState(h, torch.zeros_like(h) if self.cell == "lstm" else None)

    def step(
        self, task: Task, state: RNNState, batch: Batch, *, differentiable: bool = True
    ) -> tuple[RNNState, Tensor]:
        x, y = batch
        with torch.enable_grad() if differentiable else torch.no_grad():
            f = self.features(x)
            seq = self._pairs(f, self._targets(y, f)).unsqueeze(0)
            if state.c is not None:
                _, (h, c) = self.rnn(seq, (state.h, state.c))
            else:
                _, h = self.rnn(seq, state.h)
                c = None
            new = RNNState(h, c, state.step + 1)
            loss = task.loss_fn(self._head(new, f), y)
        return new, loss

    def evaluate(self, task: Task, state: RNNState, batch: Batch) -> Tensor:
        x, y = batch
        return task.loss_fn(self.predict(state, x), y)

    def detach_state(self, state: RNNState) -> RNNState:
        c = state.c.detach() if state.c is not None else None
        return RNNState(state.h.detach(), c, state.step)

    def meta_param_groups(self) -> list[dict]:
        """The RNN's weights at ``rnn_lr_scale``, the encoder's and head's at 1."""
        rnn = list(self.rnn.parameters())
        ids = {id(p) for p in rnn}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": rnn, "lr_scale": self.rnn_lr_scale}, {"params": rest, "lr_scale": 1.0}]

    def params_of(self, task: Task, state: RNNState) -> dict[str, Tensor]:
        """The head's weights (``head.*``) and the hidden vector ``h``: together, phi."""
        params = {f"head.{n}": p for n, p in self.head.named_parameters()}
        params["h"] = state.h[-1, 0]
        return params
