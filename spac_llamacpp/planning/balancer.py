"""Heterogeneous workload balancer: where each expert lives, as an integer program (PuLP).

For every routed expert (l, e) a binary ``x[l, e]`` says whether it is in the fast tier. Given the
utilities ``u[l, e]`` (expected tokens per decoding step routed to (l, e)), the current residency
``r[l, e]``, the expert sizes, the budget and the measured cost model, the program minimises the
expected time of one decoding step::

    vram  (parallel):  sum_l T_l + 1/H * sum_{l,e} x(1-r) load
                       T_l >= sum_e x * fast          (GPU computes its resident experts)
                       T_l >= sum_e (1-x) * slow      (CPU threads compute the others, at the same time)
    flash (serial):    sum_{l,e} [x * fast + (1-x) * slow] + 1/H * sum x(1-r) load
                       (a miss is a synchronous read, then the compute)
    subject to         sum_{l,e} x * bytes <= expert budget,  sum_e x[l, e] <= max_per_layer (optional),
                       sum_{l,e} x(1-r) load <= max_load (optional: transfers must hide under compute)

``fast``/``slow``/``load`` come from :func:`tier_costs`; docs/balancer.md has the full formulation and
its assumptions. :func:`solve` uses HiGHS when PuLP can run it, else PuLP's bundled CBC, with a time
limit and a warm start; when no solver is available or it finds nothing in time, the greedy
utility-per-byte plan (:func:`greedy`) is used and the log says so.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import resource
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout

log = logging.getLogger(__name__)

TIERS = ("vram", "flash")
SOLVERS = ("auto", "highs", "cbc", "greedy")
_SCALE = 1e6  # the MILP works in microseconds, so that its coefficients are O(1)


# --------------------------------------------------------------------------------------------------
# From utilities to per-expert costs


def activation_probability(utility: np.ndarray, tokens_per_step: float) -> np.ndarray:
    """P(expert is used in a step) from expected tokens per step, tokens routed independently."""
    n = max(float(tokens_per_step), 1.0)
    q = np.clip(np.asarray(utility, dtype=np.float64) / n, 0.0, 1.0)
    return 1.0 - (1.0 - q) ** n


@dataclass(frozen=True)
class TierCosts:
    """Expected seconds per step of each expert in either tier, and the seconds to move it up."""

    fast: np.ndarray  # [L, E]
    slow: np.ndarray  # [L, E]
    load: np.ndarray  # [L, E]
    parallel: bool  # True: per layer max(fast part, slow part); False: fast part + slow part


def tier_costs(
    tier: str, cost: CostModel, layout: ExpertLayout, utility: np.ndarray, tokens_per_step: float = 1.0
) -> TierCosts:
    """Per-expert costs of ``tier`` for utilities ``utility`` ([n_moe_layer, n_expert])."""
    if tier not in TIERS:
        raise SpacError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    u = np.asarray(utility, dtype=np.float64)
    if u.shape != (layout.n_layer, layout.n_expert):
        raise SpacError(f"utility has shape {u.shape}, expected {(layout.n_layer, layout.n_expert)}")
    p = activation_probability(u, tokens_per_step)
    # tokens per activation, given that the expert is used: u / p (>= 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(p > 0, u / np.maximum(p, 1e-300), 1.0)
    fast = np.zeros_like(u)
    slow = np.zeros_like(u)
    load = np.zeros_like(u)
    # layers with the same tensors (usually all of them) are costed together: the same elementwise arithmetic
    # as one layer at a time, in one numpy call per group instead of one per layer (the re-planner runs this
    # after every step)
    groups: dict[tuple[tuple[str, int], ...], list[int]] = {}
    for i, tensors in enumerate(layout.tensors):
        groups.setdefault(tuple(tensors), []).append(i)
    for tensors, layers in groups.items():
        i = np.asarray(layers) if len(layers) < len(layout.tensors) else slice(None)
        nbytes = sum(n for _, n in tensors)
        n_ranges = len(tensors)
        cpu = cost.cpu_seconds(tensors, b[i])
        if tier == "vram":
            fast[i] = p[i] * cost.gpu_seconds(nbytes, b[i])
            slow[i] = p[i] * cpu
            load[i] = cost.h2d_seconds(nbytes, n_ranges)
        else:
            fast[i] = p[i] * cpu
            slow[i] = p[i] * (cpu + cost.flash_miss.seconds(nbytes, n_ranges))
            load[i] = cost.flash_prefetch.seconds(nbytes, n_ranges)
    return TierCosts(fast, slow, load, parallel=tier == "vram")


def check_expert_budget(tier: str, budget: int, layout: ExpertLayout) -> int:
    """``budget`` (bytes for routed experts, from the tier's budget function in ``planning.budgets``) if at
    least one expert fits, else a one-line SpacError."""
    if tier not in TIERS:
        raise SpacError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    sizes = layout.expert_bytes
    one = int(sizes.min()) if len(sizes) else 0
    if int(budget) < one:
        raise SpacError(f"budget {format_size(int(budget))} for experts is too small for the {tier} tier: one expert "
                        f"needs {format_size(one)} ({one} bytes)")
    return int(budget)


# --------------------------------------------------------------------------------------------------
# The problem, its objective, and the exact/greedy solvers


@dataclass(frozen=True)
class Problem:
    """One placement decision (arrays are ``[n_moe_layer, n_expert]``)."""

    fast: np.ndarray
    slow: np.ndarray
    load: np.ndarray
    size: np.ndarray  # int64 bytes
    resident: np.ndarray  # bool
    budget: int  # bytes for experts
    parallel: bool
    horizon: float = 64.0  # steps over which a transfer is amortised
    max_per_layer: int | np.ndarray | None = None  # experts per layer at most: one number, or one per layer
    max_load: float | None = None  # seconds of transfers (newly placed experts) one plan may start

    @classmethod
    def build(
        cls,
        costs: TierCosts,
        layout: ExpertLayout,
        budget: int,
        resident: np.ndarray | None = None,
        horizon: float = 64.0,
        max_per_layer: int | np.ndarray | None = None,
        max_load: float | None = None,
    ) -> Problem:
        shape = costs.fast.shape
        r = np.zeros(shape, bool) if resident is None else np.asarray(resident, bool)
        if r.shape != shape:
            raise SpacError(f"residency has shape {r.shape}, expected {shape}")
        if horizon <= 0:
            raise SpacError(f"the amortisation horizon must be positive, not {horizon}")
        return cls(costs.fast, costs.slow, costs.load, layout.bytes_matrix, r, int(budget), costs.parallel,
                   float(horizon), max_per_layer, max_load)

    @property
    def shape(self) -> tuple[int, int]:
        return self.fast.shape  # type: ignore[return-value]

    @property
    def caps(self) -> np.ndarray | None:
        """``[L]`` experts each layer may hold at most (``max_per_layer`` per layer), None without a cap."""
        if self.max_per_layer is None:
            return None
        return np.broadcast_to(np.asarray(self.max_per_layer, np.int64), (self.shape[0],))

    @property
    def amortised_load(self) -> np.ndarray:
        return np.where(self.resident, 0.0, self.load / self.horizon)

    def objective(self, x: np.ndarray) -> float:
        """Modelled seconds per step of plan ``x`` (transfers amortised over the horizon)."""
        x = np.asarray(x, bool)
        moves = float(self.amortised_load[x].sum())
        if self.parallel:
            f = np.where(x, self.fast, 0.0).sum(axis=1)
            s = np.where(x, 0.0, self.slow).sum(axis=1)
            return float(np.maximum(f, s).sum()) + moves
        return float(np.where(x, self.fast, self.slow).sum()) + moves

    def step_time(self, x: np.ndarray) -> float:
        """Modelled seconds per step without the transfer term."""
        x = np.asarray(x, bool)
        if self.parallel:
            return float(np.maximum(np.where(x, self.fast, 0.0).sum(1), np.where(x, 0.0, self.slow).sum(1)).sum())
        return float(np.where(x, self.fast, self.slow).sum())

    def feasible(self, x: np.ndarray) -> bool:
        x = np.asarray(x, bool)
        if int(self.size[x].sum()) > self.budget:
            return False
        if self.max_load is not None and self.load_of(x) > self.max_load * (1 + 1e-9):
            return False
        caps = self.caps
        return not (caps is not None and bool((x.sum(axis=1) > caps).any()))

    def load_of(self, x: np.ndarray) -> float:
        """Seconds of transfers plan ``x`` starts (experts placed that are not resident)."""
        return float(self.load[np.asarray(x, bool) & ~self.resident].sum())


@dataclass
class Plan:
    """A placement: ``x[l, e]`` True = fast tier."""

    x: np.ndarray
    objective: float  # modelled seconds per step, transfers amortised
    method: str  # "highs", "cbc", "greedy"
    status: str  # "optimal", "time limit", "fallback", ...
    seconds: float = 0.0  # wall time of the decision (model build + solve)
    cpu_seconds: float = 0.0  # CPU time, the solver subprocess included
    bound: float | None = None  # a lower bound on the objective, when the solver gave one
    reason: str = ""  # why the greedy plan was used
    step: int = -1  # decoding step whose utilities it was made from
    info: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return int(self.info.get("bytes", 0))


def fill_in_order(order: np.ndarray, size: np.ndarray, room: int) -> np.ndarray:
    """The items of ``order`` (indices into ``size``) that a first-fit pass in that order takes into ``room``
    bytes: each in turn while it fits, one that does not is skipped. Vectorised: a prefix that fits is taken at
    once (a cumulative sum), so the loop runs once per skipped run, not once per item."""
    size = np.asarray(size, np.int64)
    order = np.asarray(order, np.int64)
    room = int(room)
    taken = []
    while len(order):
        s = size[order]
        fits = s <= room
        if not fits.any():
            break
        j = int(np.argmax(fits))  # the next item that fits; those before it are skipped
        order, s = order[j:], s[j:]
        cum = np.cumsum(s)
        k = int(np.searchsorted(cum, room, side="right"))  # >= 1: s[0] fits
        taken.append(order[:k])
        room -= int(cum[k - 1])
        order = order[k:]
    return np.concatenate(taken) if taken else np.zeros(0, np.int64)


def greedy(problem: Problem) -> np.ndarray:
    """Utility-per-byte greedy: take experts by decreasing (time saved - amortised move) per byte.

    serial (flash): the saving of an expert does not depend on the others, a static order is exact up
    to the last expert that does not fit. parallel (vram): the saving of moving an expert to the GPU is
    what it lowers its layer's max(GPU part, CPU part) by, which only shrinks as the layer fills, so
    a lazy greedy re-evaluates the best candidate before taking it.
    """
    L, E = problem.shape
    la = problem.amortised_load
    size = problem.size
    cap = problem.caps
    x = np.zeros((L, E), bool)
    used = 0
    per_layer = np.zeros(L, np.int64)
    load_left = math.inf if problem.max_load is None else problem.max_load
    move = np.where(problem.resident, 0.0, problem.load)
    if not problem.parallel:
        gain = problem.slow - problem.fast - la
        order = np.argsort(-(gain / np.maximum(size, 1)), axis=None, kind="stable")
        if cap is None and problem.max_load is None:  # the common case (flash), without a Python loop
            order = order[gain.ravel()[order] > 0]  # (the loop below stops at the first gain <= 0)
            x.ravel()[fill_in_order(order, size.ravel(), problem.budget)] = True
            return x
        for flat in order:
            i, e = divmod(int(flat), E)
            if gain[i, e] <= 0:
                break
            s = int(size[i, e])
            if used + s > problem.budget or (cap is not None and per_layer[i] >= cap[i]) or move[i, e] > load_left:
                continue
            x[i, e] = True
            used += s
            per_layer[i] += 1
            load_left -= move[i, e]
        return x
    f_sum = np.zeros(L)
    s_sum = problem.slow.sum(axis=1).astype(np.float64)
    fast, slow = problem.fast, problem.slow

    def gain_of(i: int, e: int) -> float:
        old = max(f_sum[i], s_sum[i])
        return old - max(f_sum[i] + fast[i, e], s_sum[i] - slow[i, e]) - la[i, e]

    g0 = np.maximum(s_sum[:, None], 0) - np.maximum(fast, s_sum[:, None] - slow) - la
    heap = [(-float(g0[i, e]) / max(int(size[i, e]), 1), i, e) for i, e in np.argwhere(g0 > 0).tolist()]
    heapq.heapify(heap)
    while heap:
        _, i, e = heapq.heappop(heap)
        s = int(size[i, e])
        if used + s > problem.budget or (cap is not None and per_layer[i] >= cap[i]) or move[i, e] > load_left:
            continue
        g = gain_of(i, e)
        if g <= 0:
            continue  # savings only shrink as the layer fills: never worth it again
        key = -g / max(s, 1)
        if heap and key > heap[0][0]:  # no longer the best: re-queue with its current saving
            heapq.heappush(heap, (key, i, e))
            continue
        x[i, e] = True
        used += s
        per_layer[i] += 1
        load_left -= move[i, e]
        f_sum[i] += fast[i, e]
        s_sum[i] -= slow[i, e]
    return x


def keep_residents(problem: Problem, x: np.ndarray) -> np.ndarray:
    """Lazy eviction: experts already resident stay while they fit and do not make the plan worse.

    Evicting costs nothing and frees nothing useful when the space stays empty, but a kept expert may
    be needed again (the utility estimate of a rarely used expert is noisy). Kept by decreasing
    utility per byte; the objective never increases.
    """
    extra = problem.resident & ~x
    if not extra.any():
        return x
    x = x.copy()
    used = int(problem.size[x].sum())
    order = np.argsort(-(problem.slow / np.maximum(problem.size, 1)), axis=None, kind="stable")
    order = order[extra.ravel()[order]]  # only the resident experts the plan left out are candidates
    if not problem.parallel and problem.max_per_layer is None:  # (flash) the loop below, without a Python loop
        order = order[(problem.fast <= problem.slow).ravel()[order]]
        x.ravel()[fill_in_order(order, problem.size.ravel(), problem.budget - used)] = True
        return x
    per_layer = x.sum(axis=1)
    f = np.where(x, problem.fast, 0.0).sum(axis=1)
    s = np.where(x, 0.0, problem.slow).sum(axis=1)
    for flat in order:
        i, e = divmod(int(flat), x.shape[1])
        size = int(problem.size[i, e])
        cap = problem.caps
        if used + size > problem.budget or (cap is not None and per_layer[i] >= cap[i]):
            continue
        if problem.parallel:
            if max(f[i] + problem.fast[i, e], s[i] - problem.slow[i, e]) > max(f[i], s[i]):
                continue
        elif problem.fast[i, e] > problem.slow[i, e]:
            continue
        x[i, e] = True
        used += size
        per_layer[i] += 1
        f[i] += problem.fast[i, e]
        s[i] -= problem.slow[i, e]
    return x


def brute_force(problem: Problem) -> tuple[np.ndarray, float]:
    """Exhaustive optimum (for tests; at most ~16 experts)."""
    n = problem.fast.size
    if n > 20:
        raise ValueError("brute force is for tiny problems only")
    best_x, best = np.zeros(problem.shape, bool), math.inf
    for bits in itertools.product((False, True), repeat=n):
        x = np.array(bits, bool).reshape(problem.shape)
        if problem.feasible(x):
            obj = problem.objective(x)
            if obj < best:
                best_x, best = x, obj
    return best_x, best


def _repair(problem: Problem, x: np.ndarray) -> np.ndarray:
    """Drop the least useful experts until ``x`` fits the budget and per-layer cap exactly."""
    x = x.copy()
    if problem.feasible(x):
        return x
    gain = (problem.slow - problem.fast - problem.amortised_load) / np.maximum(problem.size, 1)
    caps = problem.caps
    if caps is not None:
        for i in range(x.shape[0]):
            on = np.flatnonzero(x[i])
            if len(on) > caps[i]:
                drop = on[np.argsort(gain[i, on], kind="stable")][: len(on) - int(caps[i])]
                x[i, drop] = False
    on = np.argwhere(x)
    order = np.argsort(gain[x], kind="stable")
    used = int(problem.size[x].sum())
    for k in order:
        if used <= problem.budget:
            break
        i, e = on[k]
        x[i, e] = False
        used -= int(problem.size[i, e])
    if problem.max_load is not None:
        new = np.argwhere(x & ~problem.resident)
        for k in np.argsort(gain[x & ~problem.resident], kind="stable"):
            if problem.load_of(x) <= problem.max_load:
                break
            x[tuple(new[k])] = False
    return x


# --------------------------------------------------------------------------------------------------
# MILP through PuLP


def _solver(name: str, time_limit: float, gap: float, warm: bool, msg: bool):
    """A PuLP solver object, or None with the reason when the requested one cannot run."""
    import pulp

    tl = max(float(time_limit), 0.01)
    if name in ("auto", "highs"):
        try:
            s = pulp.HiGHS(msg=msg, timeLimit=tl, gapRel=gap, warmStart=warm, threads=1)
            if s.available():
                return s, "highs"
        except Exception:  # noqa: BLE001 - highspy missing or broken: try CBC
            pass
        if name == "highs":
            return None, "HiGHS is not available (pip install highspy)"
    # CBC's preprocessing costs more than it saves on these knapsack-like programs (0.4 s vs 0.06 s
    # on 48 x 128 experts)
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC for 4.0; it is what we ship with
        warnings.simplefilter("ignore", DeprecationWarning)
        s = pulp.PULP_CBC_CMD(msg=msg, timeLimit=tl, gapRel=gap, warmStart=warm, threads=1, presolve=False,
                              options=["preprocess off"])
    if not s.available():
        return None, "PuLP's bundled CBC is not available"
    return s, "cbc"


def _var(prob, name: str, lo: float | None, hi: float | None, cat: str):
    """A variable of ``prob`` (PuLP >= 3.3 wants ``prob.add_variable``; older ones ``LpVariable``)."""
    import pulp

    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lo, hi, cat=cat)
    return pulp.LpVariable(name, lowBound=lo, upBound=hi, cat=cat)


def _build(problem: Problem, free: np.ndarray, relax: bool, name: str = "spac_balancer"):
    import pulp

    L, _ = problem.shape
    prob = pulp.LpProblem(name, pulp.LpMinimize)
    cat = pulp.LpContinuous if relax else pulp.LpBinary
    la = problem.amortised_load * _SCALE
    fast = problem.fast * _SCALE
    slow = problem.slow * _SCALE
    kib = problem.size / 1024.0
    xv: dict[tuple[int, int], pulp.LpVariable] = {}
    by_layer: list[list[tuple[int, pulp.LpVariable]]] = [[] for _ in range(L)]
    for i, e in np.argwhere(free).tolist():
        v = _var(prob, f"x_{i}_{e}", 0, 1, cat)
        xv[i, e] = v
        by_layer[i].append((e, v))
    terms: list[tuple[pulp.LpVariable, float]] = []
    const = 0.0
    if problem.parallel:
        for i in range(L):
            if not by_layer[i]:
                const += float(slow[i].sum())
                continue
            t = _var(prob, f"T_{i}", 0, None, pulp.LpContinuous)
            terms.append((t, 1.0))
            row = [(v, float(fast[i, e])) for e, v in by_layer[i]]
            prob += pulp.LpAffineExpression([*row, (t, -1.0)]) <= 0, f"fast_{i}"
            srow = [(v, float(slow[i, e])) for e, v in by_layer[i]]
            prob += pulp.LpAffineExpression([*srow, (t, 1.0)]) >= float(slow[i].sum()), f"slow_{i}"
        terms += [(v, float(la[i, e])) for (i, e), v in xv.items() if la[i, e]]
    else:
        const = float(slow.sum())
        terms = [(v, float(fast[i, e] - slow[i, e] + la[i, e])) for (i, e), v in xv.items()]
    prob += pulp.LpAffineExpression(terms, constant=const)
    prob += pulp.LpAffineExpression([(v, float(kib[i, e])) for (i, e), v in xv.items()]) <= problem.budget / 1024.0, \
        "budget"
    # a valid cut: no more experts than the smallest ones fit (makes equal-size knapsacks integral)
    if xv:
        n_max = problem.budget // int(min(problem.size[i, e] for i, e in xv))
        if n_max < len(xv):
            prob += pulp.LpAffineExpression([(v, 1.0) for v in xv.values()]) <= n_max, "count"
    if problem.max_load is not None:
        row = [(v, float(problem.load[i, e] * _SCALE)) for (i, e), v in xv.items() if not problem.resident[i, e]]
        if row:
            prob += pulp.LpAffineExpression(row) <= problem.max_load * _SCALE, "transfers"
    caps = problem.caps
    if caps is not None:
        for i in range(L):
            if len(by_layer[i]) > caps[i]:
                prob += pulp.LpAffineExpression([(v, 1.0) for _, v in by_layer[i]]) <= int(caps[i]), f"cap_{i}"
    return prob, xv


def quick_bound(problem: Problem) -> float:
    """A lower bound on the optimum in O(n log n): a fractional knapsack.

    serial: exactly the LP relaxation without the per-layer cap. parallel: max(F_l, S_l) >= S_l, so
    minimising sum_l S_l + moves (GPU time ignored) bounds the optimum from below.
    """
    la = problem.amortised_load
    base = float(problem.slow.sum())
    gain = problem.slow - la if problem.parallel else problem.slow - problem.fast - la
    pos = gain > 0
    g, s = gain[pos], problem.size[pos].astype(np.float64)
    if not len(g):
        return base
    budget = float(problem.budget)
    if s.min() == s.max():  # equal sizes: only whole experts fit, the relaxation is then integral
        budget = (problem.budget // int(s[0])) * s[0]
    order = np.argsort(-g / np.maximum(s, 1.0), kind="stable")
    g, s = g[order], s[order]
    cum = np.cumsum(s)
    k = int(np.searchsorted(cum, budget, side="right"))
    total = float(g[:k].sum())
    if k < len(g):
        rem = budget - (cum[k - 1] if k else 0.0)
        total += float(g[k]) * rem / float(s[k])
    return base - total


def _free_mask(problem: Problem) -> np.ndarray:
    """Experts worth a variable: unused experts (zero cost both ways) stay in the slow tier."""
    useful = (problem.fast > 0) | (problem.slow > 0)
    if not problem.parallel:
        useful &= (problem.slow - problem.fast - problem.amortised_load) > 0
    return useful & (problem.size <= problem.budget)


def lp_bound(problem: Problem, time_limit: float = 30.0) -> float:
    """Objective of the LP relaxation: a lower bound on the optimum."""
    import pulp

    free = _free_mask(problem)
    if not free.any():
        return problem.objective(np.zeros(problem.shape, bool))
    prob, _ = _build(problem, free, relax=True, name="spac_balancer_lp")
    s, _ = _solver("auto", time_limit, 0.0, False, False)
    if s is None:
        raise SpacError("no LP solver available for the bound")
    prob.solve(s)
    return float(pulp.value(prob.objective)) / _SCALE


class SolveTiming:
    """What :func:`solve` learns across one caller's solves; thread-safe.

    * the least time a MILP takes (``startup`` plus a running estimate per free variable: the build,
      the solver start and the root LP), so that a time limit that cannot fit one falls back to the
      greedy plan at once;
    * when each kind of fallback was last warned about: a warning at most every ``warn_interval`` s,
      INFO in between (a replanner may hit the same fallback on every re-plan).

    A :class:`Balancer` owns one, shared by the plans of the decoding thread and of a
    :class:`~spac_llamacpp.planning.replanner.Replanner`'s background thread; a bare :func:`solve`
    call without ``timing=`` starts from a fresh one.
    """

    def __init__(self, startup: float = 0.02, seconds_per_var: float = 40e-6, warn_interval: float = 60.0) -> None:
        self.startup = float(startup)  # s: starting the solver process and reading its answer
        self.warn_interval = float(warn_interval)
        self._seconds_per_var = float(seconds_per_var)
        self._last_warned: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def seconds_per_var(self) -> float:
        with self._lock:
            return self._seconds_per_var

    def least_milp_seconds(self, n_free: int) -> float:
        """The least time a MILP of ``n_free`` free variables takes, as estimated so far."""
        with self._lock:
            return self.startup + self._seconds_per_var * n_free

    def record_milp(self, fixed_seconds: float, n_free: int) -> None:
        """Fold in what one MILP cost at least (its build and its solve beyond the time limit)."""
        with self._lock:
            per_var = max(fixed_seconds - self.startup, 0.0) / n_free
            self._seconds_per_var = 0.5 * self._seconds_per_var + 0.5 * per_var

    def warn_now(self, kind: str, now: float | None = None) -> bool:
        """Whether a fallback of ``kind`` is worth a warning now (then it counts as warned) or only INFO."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._last_warned.get(kind, -math.inf) < self.warn_interval:
                return False
            self._last_warned[kind] = now
            return True


def solve(
    problem: Problem,
    *,
    solver: str = "auto",
    time_limit: float = 1.0,
    gap: float = 1e-3,
    warm_start: np.ndarray | None = None,
    certify: bool = True,
    msg: bool = False,
    timing: SolveTiming | None = None,
) -> Plan:
    """Best placement found by the MILP within ``time_limit`` s (building the model included), else the
    greedy plan (logged).

    The warm start is the better of the current residency (``warm_start`` or ``problem.resident``, when
    it fits) and the greedy plan, so the result is never worse than either. With ``certify``, the MILP
    is skipped when the warm start is already within ``gap`` of :func:`quick_bound` (proven
    near-optimal: the common case when experts of a layer have equal sizes). ``timing`` carries the
    MILP time estimate and the fallback warnings over from earlier solves (see :class:`SolveTiming`).
    """
    t0, c0 = time.perf_counter(), _cpu_now()
    if timing is None:
        timing = SolveTiming()
    if solver not in SOLVERS:
        raise SpacError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    g = greedy(problem)
    g_obj = problem.objective(g)
    start, start_obj, start_name = g, g_obj, "greedy"
    for cand in (warm_start, problem.resident):
        if cand is not None:
            cand = np.asarray(cand, bool)
            if problem.feasible(cand) and problem.objective(cand) < start_obj - 1e-15:
                start, start_obj, start_name = cand, problem.objective(cand), "current plan"

    lb = quick_bound(problem)

    def finish(x: np.ndarray, method: str, status: str, reason: str = "", bound: float | None = lb) -> Plan:
        x = keep_residents(problem, x)
        info = {"bytes": int(problem.size[x].sum()), "n_fast": int(x.sum()), "greedy_objective": g_obj,
                "warm_start": start_name}
        return Plan(x, problem.objective(x), method, status, time.perf_counter() - t0, _cpu_now() - c0, bound,
                    reason, info=info)

    def fallback(reason: str, kind: str) -> Plan:
        level = logging.WARNING if timing.warn_now(kind) else logging.INFO
        log.log(level, "balancer: %s; using the greedy utility-per-byte plan", reason)
        return finish(start, "greedy", "fallback", reason)

    if solver == "greedy":
        return finish(start, "greedy", "greedy")
    free = _free_mask(problem)
    if not free.any():
        return finish(np.zeros(problem.shape, bool), "trivial", "optimal")
    if certify and start_obj - lb <= gap * max(abs(start_obj), 1e-12):
        return finish(start, "greedy", "optimal (bound)")
    try:
        s, name = _solver(solver, time_limit, gap, True, msg)
    except ImportError:
        s, name = None, "PuLP is not installed"
    if s is None:
        return fallback(f"no MILP solver ({name})", "missing")
    n_free = int(free.sum())
    least = timing.least_milp_seconds(n_free)  # build + solver start + root LP
    if time_limit - (time.perf_counter() - t0) - least < 0.01:
        return fallback(f"no time left for {name} within the {time_limit:g} s limit (greedy took "
                        f"{time.perf_counter() - t0:.3f} s, a MILP of {n_free} variables about {least:.3f} s)",
                        "no time")
    try:
        tb = time.perf_counter()
        prob, xv = _build(problem, free, relax=False)
        left = time_limit - (time.perf_counter() - t0)
        if left < 0.01:
            return fallback(f"no time left for {name} within the {time_limit:g} s limit "
                            f"(greedy and model took {time.perf_counter() - t0:.3f} s)", "no time")
        s.timeLimit = left
        for (i, e), v in xv.items():
            v.setInitialValue(1 if start[i, e] else 0)
        if problem.parallel:
            f = np.where(start, problem.fast, 0.0).sum(1)
            sl = np.where(start, 0.0, problem.slow).sum(1)
            for v in prob.variables():
                if v.name.startswith("T_"):
                    i = int(v.name[2:])
                    v.setInitialValue(max(f[i], sl[i]) * _SCALE)
        ts = time.perf_counter()
        status = prob.solve(s)
        te = time.perf_counter()
        # what the MILP costs at least: the build, and the solve beyond its time limit (or all of it)
        fixed = (ts - tb) + ((te - ts) - left if te - ts > left else te - ts)
        timing.record_milp(fixed, n_free)
    except Exception as exc:  # noqa: BLE001 - the solver process failed: never break decoding
        return fallback(f"{name} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})", "failed")
    import pulp

    values = [v.varValue for v in xv.values()]
    if any(val is None for val in values) or prob.sol_status not in (pulp.LpSolutionOptimal,
                                                                     pulp.LpSolutionIntegerFeasible):
        elapsed = time.perf_counter() - t0
        what = "hit its time limit" if elapsed >= time_limit * 0.9 else "found no solution"
        return fallback(f"{name} {what} ({pulp.LpStatus.get(status, status)} after {elapsed:.3f} s, "
                        f"limit {time_limit:g} s)", "timeout")
    x = np.zeros(problem.shape, bool)
    for (i, e), val in zip(xv, values, strict=True):
        x[i, e] = val > 0.5
    if not problem.feasible(x):
        log.info("balancer: %s's solution exceeds the budget by rounding; repaired", name)
        x = _repair(problem, x)
    status_txt = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time limit"
    if problem.objective(x) > start_obj:
        x, status_txt = start, f"{status_txt}, kept {start_name}"
    return finish(x, name, status_txt)


def _cpu_now() -> float:
    """CPU seconds of this thread plus finished child processes (the CBC subprocess)."""
    return time.thread_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime \
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime


# --------------------------------------------------------------------------------------------------
# Convenience: a balancer bound to one model, tier, budget and cost model


class Balancer:
    """Plans placements for one model, tier and budget: ``plan(utility, resident) -> Plan``.

    ``budget`` is the bytes the plan may fill with routed experts: what the tier's budget function
    (``planning.budgets.flash_budget`` / ``vram_budget``) leaves of the user's budget.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        cost: CostModel,
        tier: str,
        budget: int,
        *,
        horizon: float = 64.0,
        time_limit: float = 1.0,
        gap: float = 1e-3,
        solver: str = "auto",
        tokens_per_step: float = 1.0,
        max_per_layer: int | np.ndarray | None = None,
        transfer_steps: float | None = None,
        timing: SolveTiming | None = None,
    ) -> None:
        self.layout = layout
        self.cost = cost
        self.tier = tier
        self.budget = check_expert_budget(tier, budget, layout)
        self.horizon = horizon
        self.time_limit = time_limit
        self.gap = gap
        self.solver = solver
        self.tokens_per_step = tokens_per_step
        self.max_per_layer = max_per_layer
        self.transfer_steps = transfer_steps
        # this balancer's MILP time estimate and fallback warnings (plans may run in a Replanner's thread)
        self.timing = SolveTiming() if timing is None else timing

    def problem(self, utility: np.ndarray, resident: np.ndarray | None = None) -> Problem:
        costs = tier_costs(self.tier, self.cost, self.layout, utility, self.tokens_per_step)
        prob = Problem.build(costs, self.layout, self.budget, resident, self.horizon, self.max_per_layer)
        if self.transfer_steps is not None and costs.parallel:
            # vram: copies run on the copy engine while the layers compute; those beyond the compute of
            # the next ``transfer_steps`` steps (modelled with the current placement) would stall them
            prob = dataclasses.replace(prob, max_load=self.transfer_steps * prob.step_time(prob.resident))
        return prob

    def plan(self, utility: np.ndarray, resident: np.ndarray | None = None, time_limit: float | None = None) -> Plan:
        """Cost the utilities and solve; the plan's times include building the problem.

        ``time_limit`` (e.g. from a Replanner that keeps re-planning under a share of decode time) lowers
        the balancer's own limit for this plan.
        """
        t0, c0 = time.perf_counter(), _cpu_now()
        prob = self.problem(utility, resident)
        t1, c1 = time.perf_counter(), _cpu_now()
        limit = self.time_limit if time_limit is None else min(self.time_limit, time_limit)
        plan = solve(prob, solver=self.solver, time_limit=max(limit - (t1 - t0), 0.0), gap=self.gap,
                     warm_start=resident, timing=self.timing)
        plan.seconds += t1 - t0
        plan.cpu_seconds += c1 - c0
        return plan
