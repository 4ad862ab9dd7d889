"""Device catalogue: figures checked against the chips' own arithmetic, and name lookup."""

import pytest

from hexjax.devices import DEVICES, DeviceSpec, lookup_device
from hexjax.errors import ConfigError

GiB = 2**30

REQUIRED = ["H100-SXM", "H100-PCIe", "H200", "A100-80G", "A100-40G", "A6000", "A5000", "A4000", "A40", "L40S",
            "L4", "T4", "V100", "RTX-3090", "RTX-3090Ti", "RTX-4090", "TPU-v5e"]


def test_catalogue_has_required_devices():
    for name in REQUIRED:
        assert name in DEVICES
        assert DEVICES[name].name == name


def test_catalogue_entries_are_sane():
    for d in DEVICES.values():
        assert d.kind in ("gpu", "tpu")
        assert 8 * GiB <= d.memory_bytes <= 192 * GiB
        assert 30e12 <= d.peak_flops <= 2.5e15
        assert 200e9 <= d.memory_bandwidth_Bps <= 6e12
        assert 10e9 <= d.intra_bandwidth_Bps <= 1e12
        assert 0.05 <= d.price_per_hour <= 10
    assert DEVICES["TPU-v5e"].kind == "tpu"


# Peak dense 16-bit tensor FLOP/s from the chip itself: SMs x FLOP per clock
# per SM x boost clock. Ampere GA10x SMs do 1024 fp16 FLOP/clk dense (A100's
# SM 2048, Hopper's 4096, Volta/Turing 1024, Ada 1024); GeForce cards run fp32
# accumulation at half that rate.
ARCH = {
    "H100-SXM": (132, 4096, 1.830),
    "H100-PCIe": (114, 4096, 1.620),
    "A100-80G": (108, 2048, 1.410),
    "A100-40G": (108, 2048, 1.410),
    "A6000": (84, 1024, 1.800),
    "A5000": (64, 1024, 1.695),
    "A4000": (48, 1024, 1.560),
    "A40": (84, 1024, 1.740),
    "L40S": (142, 1024, 2.520),
    "L4": (58, 1024, 2.040),
    "T4": (40, 1024, 1.590),
    "V100": (80, 1024, 1.530),
    "RTX-3090": (82, 512, 1.695),
    "RTX-3090Ti": (84, 512, 1.860),
    "RTX-4090": (128, 512, 2.520),
}


@pytest.mark.parametrize("name", sorted(ARCH))
def test_peak_flops_match_chip_arithmetic(name):
    sms, flop_per_clock, ghz = ARCH[name]
    assert DEVICES[name].peak_flops == pytest.approx(sms * flop_per_clock * ghz * 1e9, rel=0.015)


# GDDR bandwidth from the bus: bus width (bits) x data rate (Gbit/s per pin) / 8.
BUS = {
    "A6000": (384, 16), "A5000": (384, 16), "A4000": (256, 14), "A40": (384, 14.5), "L40S": (384, 18),
    "L4": (192, 12.5), "T4": (256, 10), "RTX-3090": (384, 19.5), "RTX-3090Ti": (384, 21), "RTX-4090": (384, 21),
}


@pytest.mark.parametrize("name", sorted(BUS))
def test_memory_bandwidth_matches_bus(name):
    bits, gbps = BUS[name]
    assert DEVICES[name].memory_bandwidth_Bps == pytest.approx(bits * gbps / 8 * 1e9, rel=1e-9)


def test_hbm_parts_match_quoted_figures():
    assert DEVICES["H100-SXM"].memory_bandwidth_Bps == 3.35e12
    assert DEVICES["H200"].memory_bandwidth_Bps == 4.8e12
    assert DEVICES["H200"].memory_bytes == 141 * GiB
    assert DEVICES["A100-40G"].memory_bandwidth_Bps == 1555e9
    assert DEVICES["A100-80G"].memory_bandwidth_Bps == 2039e9
    assert DEVICES["TPU-v5e"].peak_flops == 197e12
    assert DEVICES["TPU-v5e"].memory_bytes == 16 * GiB
    assert DEVICES["A6000"].memory_bytes == 48 * GiB


def test_nvlink_parts_are_faster_inside_a_host_than_pcie_parts():
    pcie4 = DEVICES["A6000"].intra_bandwidth_Bps
    for name in ("H100-SXM", "H200", "A100-80G", "A100-40G", "V100"):
        assert DEVICES[name].intra_bandwidth_Bps > 4 * pcie4
    assert DEVICES["T4"].intra_bandwidth_Bps < pcie4 < DEVICES["H100-PCIe"].intra_bandwidth_Bps


@pytest.mark.parametrize("spelling,name", [
    ("A6000", "A6000"), ("a6000", "A6000"), ("rtx a6000", "A6000"), ("RTX_3090_TI", "RTX-3090Ti"),
    ("rtx3090ti", "RTX-3090Ti"), ("rtx-3090", "RTX-3090"), ("h100 sxm", "H100-SXM"), ("H100_PCIE", "H100-PCIe"),
    ("tpu v5e", "TPU-v5e"), ("v5e", "TPU-v5e"), ("a100-80gb", "A100-80G"), ("A100 40G", "A100-40G"),
    ("4090", "RTX-4090"), ("l40s", "L40S"),
])
def test_lookup_ignores_case_and_separators(spelling, name):
    assert lookup_device(spelling) is DEVICES[name]


def test_lookup_unknown_lists_close_matches():
    with pytest.raises(ConfigError, match=r"'A600'.*A6000"):
        lookup_device("A600")
    with pytest.raises(ConfigError) as e:
        lookup_device("h100")  # ambiguous: both H100s are suggested, neither is picked
    assert "H100-SXM" in str(e.value) and "H100-PCIe" in str(e.value)
    with pytest.raises(ConfigError, match="device.NAME"):
        lookup_device("quantum-abacus")
    with pytest.raises(ConfigError, match="string"):
        lookup_device(3090)


def test_lookup_prefers_extra_devices():
    mine = DeviceSpec("MyCard", 20 * GiB, 100e12, 800e9, 16e9, 0.5)
    cheap = DeviceSpec("A6000", 48 * GiB, 154.8e12, 768e9, 25e9, 0.1)
    extra = {"MyCard": mine, "A6000": cheap}
    assert lookup_device("my-card", extra) is mine
    assert lookup_device("a6000", extra) is cheap
    assert lookup_device("A5000", extra) is DEVICES["A5000"]
    with pytest.raises(ConfigError, match="MyCard"):
        lookup_device("MyCrad", extra)


@pytest.mark.parametrize("field,value", [
    ("memory_bytes", 0), ("memory_bytes", 1.5), ("peak_flops", 0.0), ("memory_bandwidth_Bps", -1.0),
    ("intra_bandwidth_Bps", 0), ("price_per_hour", -0.1), ("kind", "fpga"), ("name", ""),
])
def test_device_spec_rejects_bad_values(field, value):
    args = dict(name="X", memory_bytes=GiB, peak_flops=1e12, memory_bandwidth_Bps=1e9, intra_bandwidth_Bps=1e9,
                price_per_hour=1.0)
    args[field] = value
    with pytest.raises(ConfigError, match=field if field != "kind" else "kind"):
        DeviceSpec(**args)
