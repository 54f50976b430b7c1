"""Lookup-table (palettized) weight grids: 2^bits values per group of output rows, fitted by k-means.

A `QuantScheme` with ``lut_channels`` (``lut4g16``: 16 values shared by each group of 16 output rows, Core
ML's per-grouped-channel palettization) is rounded onto its table like any other grid: `LutGrid` implements
the `squeeze.grid.WeightGrid` protocol, so RTN takes each weight's nearest table entry and GPTQ picks it with
its error compensation. The table is fitted once per layer on the whole rows (block = the row) by 1-D
k-means weighted by the column importance a calibrated pass passes in (the input Hessian's diagonal, as
SqueezeLLM weighs its k-means; Kim et al. 2023), and rounded to float16, the dtype Core ML stores it in, so
the checkpoint's tables are exactly what an exporter writes.

Lloyd's iterations alone stop in poor local optima on heavy-tailed weights (measured on stories260K q_proj:
relative error 0.0173 against 0.0125 for the optimal clustering coremltools gets from the kmeans1d package).
So the start is the optimal clustering of a fine histogram of the values (dynamic programming over
`HISTOGRAM_BINS` equal-width bins, exact for the binned data), which Lloyd then polishes on the values
themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeeze.errors import SqueezeError
from squeeze.grid import LayerQParams
from squeeze.scheme import QuantScheme

LUT_DTYPE = torch.float16  # tables are stored (checkpoint, Core ML) in float16; the fit rounds to it
KMEANS_ITERATIONS = 50  # Lloyd steps at most; a fit stops earlier once no assignment changes
POLISH_ITERATIONS = 10  # Lloyd steps after the optimal binned start (measured: later ones change < 0.1%)
KMEANS_CHUNK_ELEMENTS = 1 << 24  # weights clustered at once (tables are independent, so rows are chunked)
HISTOGRAM_BINS = 256  # bins of the optimal start; its cost is entries x bins^2 per table
MAX_OPTIMAL_START_ENTRIES = 16  # tables up to 4 bits start from the optimal binned clustering
START_CHUNK_ROWS = 32  # tables whose [bins + 1]^2 float64 run costs are held at once (~17 MB each)
PRUNED_SHARE = 0.01  # a layer with this share of exact zeros is pruned: its tables hold an exact 0 (as GPTQ's)


def nearest_entry(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Index of the entry of ``tables`` [n, E] (ascending rows) nearest to each of ``x`` [n, k] (ties: lower)."""
    mids = (tables[:, 1:] + tables[:, :-1]) * 0.5
    return torch.searchsorted(mids.contiguous(), x.contiguous())


def optimal_binned_start(x: torch.Tensor, w: torch.Tensor, entries: int, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """Per row of ``x`` [n, m] (weights ``w`` [n, m]): the centroids of the optimal ``entries``-way clustering of
    its histogram (``bins`` equal-width bins as points at their weighted means), by dynamic programming over
    contiguous runs of bins (float64 prefix sums; Wang & Song 2011's recurrence without its speed-ups)."""
    return torch.cat([_binned_start(x[r : r + START_CHUNK_ROWS], w[r : r + START_CHUNK_ROWS], entries, bins)
                      for r in range(0, x.shape[0], START_CHUNK_ROWS)])


def _binned_start(x: torch.Tensor, w: torch.Tensor, entries: int, bins: int) -> torch.Tensor:
    n = x.shape[0]
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    width = (hi - lo).clamp(min=1e-30)
    index = ((x - lo) / width * bins).long().clamp_(0, bins - 1)
    xd, wd = x.double(), w.double()
    sums = [torch.zeros(n, bins, dtype=torch.float64, device=x.device).scatter_add_(1, index, v)
            for v in (wd, wd * xd, wd * xd * xd)]
    prefix = [torch.nn.functional.pad(s.cumsum(dim=1), (1, 0)) for s in sums]  # [n, bins + 1]

    def between(p):  # [n, i, j] = p[j] - p[i]: the sum over bins i..j-1
        return p.unsqueeze(1) - p.unsqueeze(2)

    mass, moment, square = (between(p) for p in prefix)
    cost = (square - moment.square() / mass.clamp(min=1e-300)).clamp_(min=0)  # within-run weighted variance
    cost = cost.float().masked_fill_(~torch.ones(bins + 1, bins + 1, dtype=torch.bool, device=x.device).triu(1),
                                     float("inf"))
    best = cost[:, 0, :]  # [n, j]: one cluster over bins 0..j-1
    choices = []
    for _ in range(entries - 1):
        total = best.unsqueeze(2) + cost  # [n, i, j]: runs up to i, then one run i..j-1
        best, arg = total.min(dim=1)
        choices.append(arg)
    cuts = torch.full((n,), bins, dtype=torch.long, device=x.device)
    bounds = [cuts]
    for arg in reversed(choices):
        cuts = arg.gather(1, cuts.unsqueeze(1)).squeeze(1)
        bounds.append(cuts)
    bounds.append(torch.zeros_like(cuts))
    edges = torch.stack(bounds[::-1], dim=1)  # [n, entries + 1] bin boundaries of the runs
    m_run = prefix[0].gather(1, edges[:, 1:]) - prefix[0].gather(1, edges[:, :-1])
    s_run = prefix[1].gather(1, edges[:, 1:]) - prefix[1].gather(1, edges[:, :-1])
    centre = lo.double() + (edges[:, :-1] + edges[:, 1:]).double() / 2 * width.double() / bins  # empty run
    return torch.where(m_run > 0, s_run / m_run.clamp(min=1e-300), centre).float()


def kmeans_1d(x: torch.Tensor, entries: int, weight: torch.Tensor | None = None,
              iterations: int = KMEANS_ITERATIONS, pin_zero: bool = False) -> torch.Tensor:
    """One ascending table of ``entries`` values per row of ``x`` [n, m], minimising sum weight * (x - table)^2.

    ``weight`` [m] weighs the columns (None: equal). Starts from `optimal_binned_start` (up to 16 entries;
    for larger tables, half the entries at the row's quantiles and half evenly over its range: measured on
    heavy-tailed rows at 256 entries, 12x less error than quantiles alone); an entry left without
    weights is moved to the row's worst-fitted value, so repeated values (a pruned layer's zeros) do not
    waste entries. ``pin_zero``: the entry nearest 0 is held at exactly 0 (pruned weights stay zero).
    """
    x = x.float().contiguous()
    n, m = x.shape
    w = torch.ones(1, m, device=x.device) if weight is None else weight.float().to(x.device).reshape(1, m)
    w = w.clamp(min=0).expand(n, m)
    if entries <= MAX_OPTIMAL_START_ENTRIES:
        tables = optimal_binned_start(x, w, entries, min(HISTOGRAM_BINS, max(4 * entries, m // 2)))
        iterations = min(iterations, POLISH_ITERATIONS)
    else:  # the start would cost entries x bins^2: every other entry at a quantile, the rest evenly over the range
        quantiles = x.sort(dim=1).values[:, ((torch.arange(entries, device=x.device) + 0.5) * m / entries).long()]
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        even = lo + (hi - lo) * (torch.arange(entries, device=x.device) + 0.5) / entries
        tables = torch.cat([quantiles[:, ::2], even[:, 1::2]], dim=1)
    assign = None
    rows = torch.arange(n, device=x.device)
    for _ in range(iterations):
        tables = tables.sort(dim=1).values
        if pin_zero:
            tables[rows, tables.abs().argmin(dim=1)] = 0.0
        new = nearest_entry(x, tables)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        mass = torch.zeros(n, entries, device=x.device).scatter_add_(1, assign, w)
        moment = torch.zeros(n, entries, device=x.device).scatter_add_(1, assign, w * x)
        tables = torch.where(mass > 0, moment / mass.clamp(min=1e-30), tables)
        empty = mass <= 0
        if bool(empty.any()):
            worst = (w * (x - tables.gather(1, assign)).square()).argmax(dim=1)
            has = empty.any(dim=1)
            tables[rows[has], empty.float().argmax(dim=1)[has]] = x[rows[has], worst[has]]
    tables = tables.to(LUT_DTYPE).float().sort(dim=1).values
    if pin_zero:
        tables[rows, tables.abs().argmin(dim=1)] = 0.0
    return tables


@dataclass(frozen=True)
class LutParams:
    """Each row's table (the rows of one group hold the same one), float32 [rows, entries], ascending."""

    lut: torch.Tensor


@dataclass(frozen=True)
class LutGrid:
    """The lookup-table grid of a ``lut{bits}g{channels}`` scheme."""

    scheme: QuantScheme

    def block_size(self, in_features: int) -> int:
        return in_features  # a table covers whole rows: fitted once, before the first column is rounded

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> LutParams:
        """Tables for ``w`` [rows, in]: k-means over each group's rows, columns weighed by ``importance`` [in]."""
        w = w.float()
        rows, cols = w.shape
        g = int(self.scheme.lut_channels)
        weight = None if importance is None else importance.float().to(w.device).repeat(g)
        pin_zero = float((w == 0).float().mean()) >= PRUNED_SHARE
        tables = []
        full = rows // g
        step = max(1, KMEANS_CHUNK_ELEMENTS // (g * cols))
        for t0 in range(0, full, step):
            t1 = min(t0 + step, full)
            tables.append(kmeans_1d(w[t0 * g : t1 * g].reshape(t1 - t0, g * cols), self.entries, weight,
                                    pin_zero=pin_zero))
        if rows % g:  # the last, smaller group of rows
            tail = w[full * g :].reshape(1, -1)
            tables.append(kmeans_1d(tail, self.entries, None if weight is None else weight[: tail.shape[1]],
                                    pin_zero=pin_zero))
        return LutParams(row_tables(torch.cat(tables), g, rows))

    @property
    def entries(self) -> int:
        return 1 << self.scheme.bits

    def nearest(self, w: torch.Tensor, params: LutParams, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        codes = nearest_entry(w.float(), params.lut)
        return codes.to(torch.uint8), params.lut.gather(1, codes)

    def layer_qparams(self, params: list[LutParams], codes: torch.Tensor, g_idx: torch.Tensor) -> LayerQParams:
        lut = params[0].lut
        ones = torch.ones(lut.shape[0], 1, device=lut.device)
        return LayerQParams(ones, torch.zeros_like(ones), g_idx, lut=lut)


def group_tables(lut: torch.Tensor, channels: int) -> torch.Tensor:
    """One table per group of ``channels`` rows, from the per-row tables [rows, E] a QuantLinear holds."""
    return lut[::channels].contiguous()


def row_tables(tables: torch.Tensor, channels: int, rows: int) -> torch.Tensor:
    """The per-row tables [rows, E] of ``tables`` [ceil(rows / channels), E] (inverse of `group_tables`)."""
    return tables.repeat_interleave(channels, dim=0)[:rows].contiguous()


def refuse_lut(scheme, name: str, target: str) -> None:
    """One clear error for a lookup-table layer headed to a format that holds integer grids only."""
    if getattr(scheme, "lut_channels", None) is not None:
        raise SqueezeError(f"{name}: {scheme.name} is a lookup-table grid, which {target} cannot hold; export it "
                           f"with --to coreml, or quantize with an integer scheme (e.g. w4g32) for {target}")
