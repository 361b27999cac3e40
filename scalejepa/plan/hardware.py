"""GPU kinds and cluster shapes that ``scalejepa-plan`` prices a step on.

A roofline should use what a GPU achieves, not its data sheet: the figures below are
**achievable** rates (a large bf16 matmul, a device-to-device copy, a large NCCL collective).
Two were seen on an H100 and an H200 of the kind this project is lent (a matmul and a copy
probe of the machines, not a benchmark of this project, which has not run on a GPU); every
other figure is the data sheet times the ratio seen on the H100, so all kinds are derated
alike.

Sources:
- Data sheets: NVIDIA A100 (2020, rev. 2021), H100 (2023), H200 (2024), B200 / DGX B200 (2024).
  Dense (no 2:4 sparsity) bf16 tensor-core peaks come from ``scalejepa.flops.PEAK_BF16_TFLOPS``.
- Seen on the lent machines (the workplace's platform notes, 2026-11; no results file of
  this project holds them): on the H100 SXM an 8192^3 bf16 matmul at ~798 TFLOP/s (81% of
  989) and device copies at ~3.0 TB/s (90% of 3.35 TB/s); on the H200 copies at ~4.3 TB/s
  (90% of 4.8 TB/s).
- Collectives: nccl-tests all-gather / reduce-scatter "bus bandwidth" on NVSwitch systems
  reaches roughly 80% of the per-direction NVLink rate; between nodes, about 90% of one NIC
  per GPU (the DGX reference designs give each GPU its own NIC: 200 Gb/s for A100, 400 Gb/s
  for H100 / H200 / B200). Latency per ring step: ~1 us within a node, ~5 us across nodes.
  These are data-sheet-derived, not measured here; ``--inter-node-gbps`` overrides the link.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from scalejepa.config import ConfigError
from scalejepa.flops import peak_tflops_for_name

# Ratios seen on the lent H100 SXM (see the module docstring).
MATMUL_EFFICIENCY = 798.0 / 989.0
COPY_EFFICIENCY = 3.0 / 3.35
NVLINK_BUS_EFFICIENCY = 0.8
NIC_EFFICIENCY = 0.9


@dataclass(frozen=True)
class GpuKind:
    """One GPU model: what ``--gpus KIND:...`` names."""

    kind: str
    device_name: str  # as torch.cuda.get_device_name() prints it (matches the peak table)
    memory_gib: float
    hbm_tb_s: float  # data sheet
    fp32_tflops: float  # data sheet, non-tensor-core FP32 (fp32 matmuls without TF32)
    nvlink_gb_s: float  # data sheet, per GPU per direction (0: PCIe only)
    pcie_gb_s: float  # per direction
    nic_gbit_s: float  # one NIC per GPU in the vendor's reference node
    measured: tuple[str, ...] = ()  # which achievable figures were seen on this kind (not data sheet x ratio)

    @property
    def bf16_tflops(self) -> float:
        peak = peak_tflops_for_name(self.device_name)
        assert peak is not None, f"{self.device_name} is missing from scalejepa.flops.PEAK_BF16_TFLOPS"
        return peak

    def achievable(self) -> dict[str, float]:
        """Achievable rates in FLOP/s and bytes/s (see the module docstring)."""
        copy = {"h100-sxm": 3.0e12, "h200": 4.3e12}.get(self.kind, self.hbm_tb_s * 1e12 * COPY_EFFICIENCY)
        intra = self.nvlink_gb_s if self.nvlink_gb_s else self.pcie_gb_s
        return {
            "bf16_flops": self.bf16_tflops * 1e12 * MATMUL_EFFICIENCY,
            "fp32_flops": self.fp32_tflops * 1e12 * MATMUL_EFFICIENCY,
            "hbm_bytes": copy,
            "intra_node_bytes": intra * 1e9 * NVLINK_BUS_EFFICIENCY,
            "inter_node_bytes": self.nic_gbit_s / 8 * 1e9 * NIC_EFFICIENCY,
        }


GPU_KINDS: dict[str, GpuKind] = {g.kind: g for g in (
    GpuKind("a100-40gb", "NVIDIA A100-SXM4-40GB", 40, 1.555, 19.5, 300, 32, 200),
    GpuKind("a100-80gb", "NVIDIA A100-SXM4-80GB", 80, 2.039, 19.5, 300, 32, 200),
    GpuKind("h100-sxm", "NVIDIA H100 80GB HBM3", 80, 3.35, 67, 450, 64, 400, ("bf16 matmul", "copy")),
    GpuKind("h100-pcie", "NVIDIA H100 PCIe", 80, 2.0, 51, 0, 64, 400),
    GpuKind("h200", "NVIDIA H200", 141, 4.8, 67, 450, 64, 400, ("copy",)),
    GpuKind("b200", "NVIDIA B200", 180, 8.0, 75, 900, 64, 400),
)}
# Usable memory: the CUDA context, cuBLAS / NCCL workspaces and the caching allocator's
# fragmentation are not tensors, so a tracker does not see them. The verdict keeps this much
# free (assumed, not measured here: typical figures for eager PyTorch training).
RESERVED_GIB = 2.0
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Cluster:
    gpu: GpuKind
    nodes: int
    per_node: int
    inter_node_gb_s: float | None = None  # override of the per-GPU network rate (GB/s)

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    def rates(self) -> dict[str, float]:
        rates = self.gpu.achievable()
        if self.inter_node_gb_s:
            rates["inter_node_bytes"] = self.inter_node_gb_s * 1e9
        return rates

    def usable_gib(self) -> float:
        return self.gpu.memory_gib * (1 - FRAGMENTATION) - RESERVED_GIB

    def describe(self) -> str:
        return f"{self.world_size} x {self.gpu.kind} ({self.nodes} node{'s' * (self.nodes > 1)} x {self.per_node})"

    def to_dict(self) -> dict:
        return {"kind": self.gpu.kind, "device_name": self.gpu.device_name, "nodes": self.nodes,
                "per_node": self.per_node, "world_size": self.world_size, "memory_gib": self.gpu.memory_gib,
                "usable_gib": self.usable_gib(), "rates": self.rates(), "measured_rates": list(self.gpu.measured),
                "data_sheet": {k: v for k, v in asdict(self.gpu).items() if k not in ("kind", "measured")}
                | {"bf16_tflops": self.gpu.bf16_tflops}}


_SPEC = re.compile(r"^(?P<kind>[a-z0-9-]+):(?:(?P<nodes>\d+)x)?(?P<per>\d+)$")


def parse_cluster(text: str, inter_node_gb_s: float | None = None) -> Cluster:
    """``KIND:NODESxPER_NODE`` (``h100-sxm:2x8``) or ``KIND:N`` (one node of N)."""
    match = _SPEC.match(text.strip().lower())
    if not match:
        raise ConfigError(f"--gpus {text!r} must look like KIND:NODESxPER_NODE, e.g. h100-sxm:2x8 or a100-80gb:1x8; "
                          f"kinds: {', '.join(GPU_KINDS)}")
    kind = match["kind"]
    if kind not in GPU_KINDS:
        raise ConfigError(f"unknown GPU kind {kind!r}; known kinds: {', '.join(GPU_KINDS)}")
    nodes, per_node = int(match["nodes"] or 1), int(match["per"])
    if nodes < 1 or per_node < 1:
        raise ConfigError(f"--gpus {text!r}: nodes and GPUs per node must be >= 1")
    return Cluster(GPU_KINDS[kind], nodes, per_node, inter_node_gb_s)


def with_world(cluster: Cluster, nodes: int, per_node: int) -> Cluster:
    return replace(cluster, nodes=nodes, per_node=per_node)
