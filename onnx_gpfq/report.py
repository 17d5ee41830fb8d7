"""The quantization report: one row per layer (errors, chosen step constant, form, rows, time), what was left in
float and why, and the totals (weight bytes, the fraction of the model's weights quantized, the target)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from . import cpu
from .ops import Skipped


@dataclass(frozen=True)
class LayerReport:
    """One row of the report. Errors are relative output errors ||XW - X~Q||^2 / ||XW||^2."""

    node: str
    op_type: str
    weight_shape: tuple[int, ...]
    bits: str
    granularity: str
    scale_rule: str
    c: float  # median chosen C over output channels
    rel_error: float
    rel_error_rtn: float
    sparsity: float
    form: str  # "gram" | "residual" | "shared"
    rows: int  # rows of X used (samples x patches)
    seconds: float
    damp: float = 0.0  # the ridge the layer was quantized with (--damp; auto: chosen on held-out rows)
    upstream: float = 1.0  # the share of the upstream error its codes take back (--upstream; auto: held-out rows)


@dataclass(frozen=True)
class ActivationReport:
    """One quantized activation tensor: its rule (``act_ranges``: minmax, percentile:P or mse; the one
    --act-calibration auto chose), the clip range [lo, hi] before the zero point is rounded, and the
    SQNRs (dB) of its fake quantization: of the tensor itself over its value sample, and of the outputs
    ||XW||^2 / ||(fq(X) - X) W||^2 of the layers it was scored at (``layers``; None: none, scored
    on itself)."""

    tensor: str
    bits: int
    rule: str
    lo: float
    hi: float
    sqnr_db: float
    layers_sqnr_db: float | None
    layers: tuple[str, ...]


@dataclass
class Report:
    layers: list[LayerReport] = field(default_factory=list)
    activation_rows: list[ActivationReport] = field(default_factory=list)  # in the order they were calibrated
    skipped: list[Skipped] = field(default_factory=list)
    activations: int = 0  # activation tensors with QDQ
    float_weight_bytes: int = 0  # float bytes of the weights quantized
    quant_weight_bytes: int = 0
    model_weight_bytes: int = 0  # every weight of the model (``ops.model_weight_bytes``), quantized or not
    calibration_samples: int = 0
    spilled_bytes: int = 0  # frontier activations written to disk beyond the memory budget
    peak_held_bytes: int = 0  # the most captured-activation bytes held in memory at once (<= the budget)
    seconds: float = 0.0
    options: dict = field(default_factory=dict)
    target: str = "any"
    bounded_layers: int = 0  # layers whose 8-bit codes were kept within the target's pair bound
    fixed_inputs: dict = field(default_factory=dict)  # --fix-input: name -> value, removed from the interface
    inlined_ifs: list = field(default_factory=list)  # If nodes replaced by the branch the fixed inputs take
    smoothed: list = field(default_factory=list)  # smooth.Smoothed per smoothable tensor (--smooth)
    promotions: list = field(default_factory=list)  # mixed.Promotion per activation tensor (--act-bits auto)
    token_mask: str | None = None  # --token-mask: the input marking padded tokens, None: every row used
    padded_fraction: float = 0.0  # of the calibration tokens, the share it marks as padding

    @property
    def weight_fraction(self) -> float:
        """Fraction of the model's weight bytes quantized: the float bytes of the quantized
        weights over all float initializer bytes that weight-carrying ops (the registered layers,
        LSTM, GRU, RNN, Attention, Einsum, ..., inside subgraphs too) read as weights, biases and
        other vectors excepted (``ops.model_weight_bytes``). 1.0 for a model without weights."""
        return self.float_weight_bytes / self.model_weight_bytes if self.model_weight_bytes else 1.0

    def table(self) -> str:
        """The report as a text table (one row per layer, then totals)."""
        head = f"{'layer':32s} {'op':6s} {'weight':>16s} {'bits':>7s} {'gran':>7s} {'C':>5s} {'err gpfq':>9s} {'err rtn':>9s} {'zeros':>6s} {'form':>9s} {'rows':>7s} {'s':>6s}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(str(d) for d in r.weight_shape)
            lines.append(f"{r.node[-32:]:32s} {r.op_type:6s} {shape:>16s} {r.bits:>7s} {r.granularity:>7s} {r.c:5.2f} "
                         f"{r.rel_error:9.2e} {r.rel_error_rtn:9.2e} {r.sparsity:6.1%} {r.form[:9]:>9s} {r.rows:7d} {r.seconds:6.2f}")
        for s in self.skipped:
            lines.append(f"{s.node[-32:]:32s} {s.op_type:6s} left in float: {s.reason}")
        if self.activation_rows:
            head = f"{'activation':32s} {'bits':>4s} {'rule':>17s} {'lo':>10s} {'hi':>10s} {'SQNR dB':>7s} {'layers dB':>9s}  scored at"
            lines += ["", head, "-" * len(head)]
            for a in self.activation_rows:
                at = ", ".join(a.layers) if a.layers else "itself"
                layers_db = "-" if a.layers_sqnr_db is None else f"{a.layers_sqnr_db:9.1f}"
                lines.append(f"{a.tensor[-32:]:32s} {a.bits:4d} {a.rule:>17s} {a.lo:10.4g} {a.hi:10.4g} {a.sqnr_db:7.1f} "
                             f"{layers_db:>9s}  {at[:60]}")
        ratio = self.float_weight_bytes / max(self.quant_weight_bytes, 1)
        if self.fixed_inputs:
            fixed = ", ".join(f"{k}={v}" for k, v in self.fixed_inputs.items())
            lines.append(f"inputs fixed: {fixed} (removed from the model's inputs); {len(self.inlined_ifs)} If node(s) "
                         "inlined")
        if self.smoothed:
            on = [m for m in self.smoothed if m.alpha > 0]
            gain = sum(m.error_off for m in on) / max(sum(m.error for m in on), 1e-30) if on else 1.0
            lines.append(f"smoothing: {len(on)} of {len(self.smoothed)} smoothable activation tensors migrated "
                         f"(alpha {', '.join(sorted({f'{m.alpha:g}' for m in on})) or '-'}); their layers' 8-bit "
                         f"output error {gain:.2f}x lower")
        ridged = [layer for layer in self.layers if layer.damp > 0]
        if self.options.get("damp") == "rows" and ridged:
            lines.append(f"--damp rows: {len(ridged)} of {len(self.layers)} layers had fewer calibration rows than "
                         f"inputs and were fitted with the ridge")
        if self.options.get("damp") == "auto":
            lines.append(f"--damp auto: {len(ridged)} of {len(self.layers)} layers fitted with the ridge "
                         f"(damp {', '.join(sorted({f'{layer.damp:g}' for layer in ridged})) or '-'}), chosen on held-out rows")
        if self.options.get("upstream") == "auto":
            counts = Counter(layer.upstream for layer in self.layers if layer.form != "shared")
            lines.append("--upstream auto: layers taking back " + ", ".join(
                f"{share:g} of the upstream error: {counts[share]}" for share in sorted(counts, reverse=True))
                + ", chosen on held-out rows")
        if self.token_mask:
            lines.append(f"token mask {self.token_mask}: {self.padded_fraction:.0%} of the calibration tokens are padding; "
                         "the MatMul rows of X there left out of GPFQ")
        for p in (p for p in self.promotions if p.promoted):
            lines.append(f"16-bit activation {p.tensor[-48:]}: 8-bit output error {p.cost:.2e}; {len(p.consumers)} "
                         f"layer(s) writing or reading it leave the int8 kernels (readers: {p.macs / 1e6:.1f} M "
                         "multiply-adds per sample in float)")
        if self.promotions:
            wide = sum(p.promoted for p in self.promotions)
            lines.append(f"--act-bits auto: {wide} of {len(self.promotions)} activation tensors at 16 bits")
        lines.append(f"target {self.target}: " + (f"{self.bounded_layers} layers' 8-bit codes kept within the pair bound "
                                                  f"(same-sign |q_2j| + |q_2j+1| <= {cpu.PAIR_BOUND}) of x86's AVX2 int8 kernels"
                                                  if self.bounded_layers else "no code constraint needed"))
        lines.append(f"{len(self.layers)} layers quantized, {len(self.skipped)} left in float, {self.activations} activation "
                     f"tensors quantized; weights {self.float_weight_bytes / 1024:.1f} KiB -> {self.quant_weight_bytes / 1024:.1f} KiB "
                     f"({ratio:.1f}x), {self.weight_fraction:.1%} of the model's weight bytes quantized; {self.calibration_samples} calibration samples; {self.seconds:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "layers": [vars(layer) | {"weight_shape": list(layer.weight_shape)} for layer in self.layers],
            "left_in_float": [vars(s) for s in self.skipped],
            "activation_tensors_quantized": self.activations,
            "activations": [vars(a) | {"layers": list(a.layers), "sqnr_db": _finite(a.sqnr_db),
                                       "layers_sqnr_db": _finite(a.layers_sqnr_db)} for a in self.activation_rows],
            "float_weight_bytes": self.float_weight_bytes,
            "quant_weight_bytes": self.quant_weight_bytes,
            "model_weight_bytes": self.model_weight_bytes,
            "weight_fraction_quantized": self.weight_fraction,
            "calibration_samples": self.calibration_samples,
            "spilled_bytes": self.spilled_bytes,
            "peak_held_bytes": self.peak_held_bytes,
            "seconds": self.seconds,
            "target": self.target,
            "bounded_layers": self.bounded_layers,
            "options": self.options,
            "fixed_inputs": self.fixed_inputs,
            "inlined_ifs": self.inlined_ifs,
            "smoothed": [vars(m) for m in self.smoothed],
            "act16": [vars(p) | {"consumers": list(p.consumers)} for p in self.promotions],
            "token_mask": self.token_mask,
            "padded_fraction": self.padded_fraction,
        }


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: an SQNR without noise is written as null."""
    return value if value is not None and value != float("inf") else None
