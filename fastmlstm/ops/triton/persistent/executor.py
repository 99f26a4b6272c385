"""Runs a persistent kernel's :class:`~.schedule.Schedule` on the CPU with torch, tile by tile, so that
CI can check what no CPU can run: the schedule computes the recurrence (against the reference
backend), every epilogue chunk of every output tile is finished exactly once per step, and the flag protocol neither
deadlocks nor spins forever whatever order the CTAs run in.

Each CTA is a Python generator that follows the kernels' program (:mod:`.gluon_forward`,
:mod:`.gluon_backward`) item by item: the grid flag at the start of a phase, the partial of each
item computed from the buffers as they are at that moment (the kernels load the activation tile
after the flag), the cluster barrier before a contribution is counted on its tile's ticket; then,
item by item again, the wait for the ticket to count every part and the item's slice of its
tile's epilogue chunks, each summing the parts in part order; the cluster barrier and the grid
flag at the end of a phase. A CTA that must wait
yields; the scheduler picks the next CTA at random (seeded) among all that are not finished, and a
waiting CTA that is picked polls its flag once. Two failures, each naming the step:

- :class:`Deadlock`: every unfinished CTA waits for a flag that nothing can set any more;
- :class:`SpinTimeout`: a CTA polled more than ``spin_limit`` times (the kernels' time limit).

The arithmetic follows the kernels: products of 16-bit values accumulated in float32 per K range,
parts summed in part order, the epilogues of :mod:`.gluon_forward` / :mod:`.gluon_backward`.
Dimension letters as in :mod:`.schedule`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator

import torch

from .schedule import Schedule, ticket_target


class Deadlock(RuntimeError):
    """No unfinished CTA can make progress."""


class SpinTimeout(RuntimeError):
    """A CTA gave up waiting for a flag (the kernels record this in their error word)."""


@dataclasses.dataclass
class Wait:
    """A flag a CTA polls until ``ready()``; ``what`` names it (and the step) for the errors."""

    ready: Callable[[], bool]
    what: str


def describe(sched: Schedule, n: int, T: int) -> str:
    """Phase instance n as the host names it (what the kernels' error word decodes to)."""
    if sched.direction == "forward":
        return f"step {n // 2}, phase {sched.phases[n % 2].product}"
    if n == 2 * T:
        return "the gradient of h0 (after step 0)"
    return f"step {T - 1 - n // 2}, phase {sched.phases[n % 2].product}"


def interleave(programs: dict[int, Iterator], seed: int, spin_limit: int) -> int:
    """Run the CTAs' generators to the end in a random order; returns the scheduling rounds."""
    rng = random.Random(seed)
    waiting: dict[int, Wait | None] = {cta: None for cta in programs}
    polls = {cta: 0 for cta in programs}
    rounds = 0
    while waiting:
        if all(w is not None and not w.ready() for w in waiting.values()):
            stuck = "; ".join(f"CTA {cta} waits for {w.what}" for cta, w in sorted(waiting.items())[:4])
            raise Deadlock(f"deadlock: no CTA can proceed ({stuck})")
        cta = rng.choice(list(waiting))
        rounds += 1
        wait = waiting[cta]
        if wait is not None:
            if not wait.ready():
                polls[cta] += 1
                if polls[cta] > spin_limit:
                    raise SpinTimeout(f"CTA {cta} gave up after {spin_limit} polls waiting for {wait.what}")
                continue
            polls[cta] = 0
        try:
            waiting[cta] = next(programs[cta])
        except StopIteration:
            del waiting[cta]
    return rounds


class Flags:
    """The kernels' counters: grid flags per phase instance, tickets per tile, cluster barriers."""

    def __init__(self, sched: Schedule, instances: int):
        self.sched = sched
        self.sync = [0] * instances
        groups = [-(-p.m_tiles // sched.cluster) for p in sched.phases]
        self.tile_base = [0, groups[0] * sched.cluster]
        self.tickets = [0] * (self.tile_base[1] + groups[1] * sched.cluster)
        self.arrivals = [0] * sched.clusters
        self.skip_arrival: tuple[int, int] | None = None  # (cta, instance): a fault, for the tests

    def cluster_barrier(self, cta: int, count: list[int], what: str) -> Iterator[Wait]:
        """Every CTA of the cluster passes its k-th barrier together."""
        q = cta // self.sched.cluster
        self.arrivals[q] += 1
        count[0] += 1
        target = count[0] * self.sched.cluster
        if self.arrivals[q] < target:
            yield Wait(lambda: self.arrivals[q] >= target, f"its cluster's barrier ({what})")

    def wait_grid(self, n: int, what: str) -> Iterator[Wait]:
        if n >= 0 and self.sync[n] != self.sched.ctas:
            yield Wait(lambda: self.sync[n] == self.sched.ctas, f"the grid flag of {what}")

    def arrive_grid(self, cta: int, n: int) -> None:
        if self.skip_arrival != (cta, n):
            self.sync[n] += 1


@dataclasses.dataclass
class Hooks:
    """What a direction computes: ``partial(phase, t, m_tile, kb_lo, kb_hi)`` -> a float32 tensor
    [B, units of the tile] (or a tuple of 4 for the gates) and ``epilogue(phase, t, units, rows,
    parts)`` for one chunk (a slice of units and one of batch rows) from its values of the parts,
    in part order; ``steps`` the (t, phase instance base) walk order; ``tail`` the backward's extra
    phase."""

    partial: Callable
    epilogue: Callable
    steps: list[tuple[int, int]]
    tail: int | None = None


def cta_program(sched: Schedule, flags: Flags, hooks: Hooks, cta: int, ws: dict, finished: dict,
                T: int) -> Iterator[Wait]:
    """One CTA of the kernel, as a generator that yields whenever it must wait."""
    q, rank = divmod(cta, sched.cluster)
    barriers = [0]
    walk = [(t, base + p, p) for t, base in hooks.steps for p in range(len(sched.phases))]
    if hooks.tail is not None:
        walk.append((-1, hooks.tail, 0))
    for t, n, p in walk:
        what = describe(sched, n, T)
        yield from flags.wait_grid(n - 1, describe(sched, n - 1, T) if n > 0 else what)
        phase = sched.phases[p]
        mine = sched.items_of(q, p)
        # Pass 1: every contribution, counted on its tile's ticket where the tile is split.
        for it in mine:
            m_tile = it.group * sched.cluster + rank
            real = m_tile < phase.m_tiles
            ws[(p, it.slot0 + it.part, rank)] = hooks.partial(p, t, m_tile, it.kb_lo, it.kb_hi) if real else None
            yield from flags.cluster_barrier(cta, barriers, what)
            if it.parts > 1:
                flags.tickets[flags.tile_base[p] + m_tile] += 1
        # Pass 2: each contribution's slice of its tile, once every part is stored.
        for it in mine:
            m_tile = it.group * sched.cluster + rank
            ticket, target = flags.tile_base[p] + m_tile, ticket_target(n, it.parts)
            if it.parts > 1 and flags.tickets[ticket] != target:
                yield Wait(lambda ticket=ticket, target=target: flags.tickets[ticket] == target,
                           f"the other parts of tile {m_tile}, {what}")
            if m_tile >= phase.m_tiles:
                continue
            parts = [ws[(p, it.slot0 + j, rank)] for j in range(it.parts)]
            lo, hi = sched.finish_slice(phase, it.part, it.parts)
            for c in range(lo, hi):
                units, rows = sched.chunk_rect(phase, m_tile, c)
                if units.stop > units.start and rows.stop > rows.start:
                    hooks.epilogue(p, t, units, rows, _chunk_of(parts, units.start - m_tile * phase.units_per_tile,
                                                                units.stop - units.start, rows))
                key = (n, m_tile, c)
                finished[key] = finished.get(key, 0) + 1
        yield from flags.cluster_barrier(cta, barriers, what)
        flags.arrive_grid(cta, n)


def _chunk_of(parts: list, u0: int, units: int, rows: slice) -> list:
    """The parts' values of one chunk: [rows, units u0 .. u0 + units) of each (each gate's)."""
    if parts[0] is None:  # hooks that compute nothing (the protocol alone)
        return parts
    if isinstance(parts[0], tuple):
        return [tuple(g[rows, u0:u0 + units] for g in part) for part in parts]
    return [part[rows, u0:u0 + units] for part in parts]


def execute(sched: Schedule, hooks: Hooks, T: int, seed: int = 0, spin_limit: int = 1 << 20,
            fault: tuple[int, int] | None = None) -> dict:
    """Run every CTA of ``sched`` to the end; returns {(phase instance, tile, chunk): times finished}.

    ``fault`` = (cta, n): that CTA does not count itself on the grid flag of instance n (a test of
    the bounded waits)."""
    instances = len(hooks.steps) * len(sched.phases) + (hooks.tail is not None)
    flags = Flags(sched, instances)
    flags.skip_arrival = fault
    ws: dict = {}
    finished: dict = {}
    programs = {cta: cta_program(sched, flags, hooks, cta, ws, finished, T) for cta in range(sched.ctas)}
    interleave(programs, seed, spin_limit)
    for (p, block, _), _ in ws.items():
        assert block < sched.slots, f"workspace block {block} past the {sched.slots} allocated"
    return finished


# ------------------------------------------------------------------------------ the arithmetic

def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * _sigmoid(2.0 * x) - 1.0


def _ordered_sum(parts: list):
    """The parts summed in part order (tuples of gate partials summed gate by gate)."""
    if isinstance(parts[0], tuple):
        return tuple(_ordered_sum([p[g] for p in parts]) for g in range(len(parts[0])))
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def _ranges(sched: Schedule, H: int):
    def units(p: int, m_tile: int) -> slice:
        u = sched.phases[p].units_per_tile
        return slice(m_tile * u, min(H, (m_tile + 1) * u))

    def k_range(p: int, kb_lo: int, kb_hi: int) -> slice:
        phase = sched.phases[p]
        return slice(kb_lo * phase.block_k, min(kb_hi * phase.block_k, phase.K))

    return units, k_range


def forward_hooks(sched: Schedule, b) -> Hooks:
    """The forward kernel's products and epilogues on :class:`.launch.ForwardBuffers` ``b``."""
    H, dtype = b.H, b.proj.dtype
    units, k_range = _ranges(sched, H)

    def partial(p, t, m_tile, kb_lo, kb_hi):
        u, k = units(p, m_tile), k_range(p, kb_lo, kb_hi)
        if sched.phases[p].product == "hm":
            return b.h[t][:, k].float() @ b.w_hm[u, k].float().t()
        return tuple(b.m[:, k].float() @ b.w_hh[g * H + u.start:g * H + u.stop, k].float().t() for g in range(4))

    def epilogue(p, t, u, bs, parts):
        total = _ordered_sum(parts)
        proj = b.proj[t][bs]
        if sched.phases[p].product == "hm":
            xm = proj[:, 4 * H + u.start:4 * H + u.stop]
            b.m[bs, u] = (total * xm.float()).to(dtype)
            if b.save:
                b.act[t][bs, 4 * H + u.start:4 * H + u.stop] = xm
                b.act[t][bs, 5 * H + u.start:5 * H + u.stop] = total.to(dtype)
            return
        x = [proj[:, g * H + u.start:g * H + u.stop].float() for g in range(4)]
        i, f, o = (_sigmoid(total[g] + x[g]) for g in range(3))
        g_u = _tanh(total[3] + x[3])
        c_prev = b.c[t % b.c_mod][bs, u]
        c = f * c_prev + i * g_u
        h = o * _tanh(c)
        if b.lengths is not None:
            active = (t < b.lengths[bs])[:, None]
            c = torch.where(active, c, c_prev)
            h = torch.where(active, h, b.h[t][bs, u].float())
        b.c[(t + 1) % b.c_mod][bs, u] = c
        b.h[t + 1][bs, u] = h.to(dtype)
        if b.save:
            for g, gate in enumerate((i, f, o, g_u)):
                b.act[t][bs, g * H + u.start:g * H + u.stop] = gate.to(dtype)

    return Hooks(partial=partial, epilogue=epilogue, steps=[(t, 2 * t) for t in range(b.T)])


def _cell_backward(b, t, u, bs, dh, active):
    """Step t's cell derivatives for units u, batch rows bs: dz into grad_proj, dc_{t-1} into b.dc."""
    H, dtype = b.H, b.grad_proj.dtype
    i, f, o, g_u = (b.act[t][bs, g * H + u.start:g * H + u.stop].float() for g in range(4))
    c = b.cells[t][bs, u]
    c_prev = b.cells[t - 1][bs, u] if t > 0 else b.c0[bs, u]
    dc = b.dc[bs, u].clone()
    if b.dcells is not None:
        dc += b.dcells[t][bs, u]
    tanh_c = _tanh(c)
    from_h = dh * o * (1.0 - tanh_c * tanh_c)
    dc += torch.where(active, from_h, 0.0) if active is not None else from_h
    dz = [dc * g_u * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dh * tanh_c * o * (1.0 - o), dc * i * (1.0 - g_u * g_u)]
    dc_prev = dc * f
    if active is not None:
        dz = [torch.where(active, d, 0.0) for d in dz]
        dc_prev = torch.where(active, dc_prev, dc)
    b.dc[bs, u] = dc_prev
    for g, d in enumerate(dz):
        b.grad_proj[t][bs, g * H + u.start:g * H + u.stop] = d.to(dtype)


def backward_hooks(sched: Schedule, b) -> Hooks:
    """The backward kernel's products and epilogues on :class:`.launch.BackwardBuffers` ``b``."""
    H, dtype = b.H, b.grad_proj.dtype
    units, k_range = _ranges(sched, H)

    def partial(p, t, m_tile, kb_lo, kb_hi):
        u, k = units(p, m_tile), k_range(p, kb_lo, kb_hi)
        if sched.phases[p].product == "dh":
            return b.ghm[t + 1][:, k].float() @ b.w_hm[k, u].float()
        return b.grad_proj[t][:, k].float() @ b.w_hh[k, u].float()

    def epilogue(p, t, u, bs, parts):
        total = _ordered_sum(parts)
        if sched.phases[p].product == "dm":
            act = b.act[t][bs]
            b.grad_proj[t][bs, 4 * H + u.start:4 * H + u.stop] = (
                total * act[:, 5 * H + u.start:5 * H + u.stop].float()).to(dtype)
            b.ghm[t][bs, u] = (total * act[:, 4 * H + u.start:4 * H + u.stop].float()).to(dtype)
            return
        dh, active = total, None
        if b.lengths is not None:
            active = (t < b.lengths[bs])[:, None]
            dh = dh + torch.where((t + 1 < b.lengths[bs])[:, None], 0.0, b.dh[bs, u])
        if t < 0:
            b.dh[bs, u] = dh
            return
        if b.dout is not None:
            dh = dh + b.dout[t][bs, u].float()
        if b.lengths is not None:
            b.dh[bs, u] = dh
        _cell_backward(b, t, u, bs, dh, active)

    return Hooks(partial=partial, epilogue=epilogue, steps=[(t, 2 * (b.T - 1 - t)) for t in range(b.T - 1, -1, -1)],
                 tail=2 * b.T)


def runner(direction: str, seed: int = 0, spin_limit: int = 1 << 20, record: list | None = None,
           fault: tuple[int, int] | None = None):
    """A :data:`.launch.Runner` that executes the schedule on the CPU instead of launching it
    (``record`` collects, per call, how often each (phase instance, tile, chunk) was finished)."""

    def run(sched: Schedule, bufs) -> None:
        hooks = forward_hooks(sched, bufs) if direction == "forward" else backward_hooks(sched, bufs)
        finished = execute(sched, hooks, bufs.T, seed=seed, spin_limit=spin_limit, fault=fault)
        if record is not None:
            record.append((sched, bufs.T, finished))

    return run
