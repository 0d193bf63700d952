"""Names, limits and defaults shared across the package, in one place so they never drift."""

import os

import torch

# Hugging Face file names, read and written.
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PROVENANCE = "tensormerge.json"
PARTIAL_SUFFIX = ".partial"
RESUME_DIR = ".tensormerge-resume"  # the resume manifest, inside OUT.partial

# Files copied from the base (or first input): everything a loader needs beside the weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEX_NAMES = (SAFE_INDEX, BIN_INDEX, "adapter_model.safetensors.index.json")

# A safetensors header larger than this is refused before it is read: real headers are a few MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DEFAULT_SHARD_SIZE = 5 * 1000**3  # "5GB" as transformers writes it
DEFAULT_MAX_MEMORY = 4 * 1024**3

# Compiled CPU kernels (numba) and their generated sources are cached here, per machine.
KERNEL_CACHE = os.environ.get("TENSORMERGE_KERNEL_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tensormerge", "kernels")

# dask: a task is a run of whole blocks reading about this much; a worker process may use
# --max-memory of tensor data plus this much for Python, torch and dask themselves.
DASK_TASK_BYTES = 256 * 1024**2
DASK_WORKER_OVERHEAD = 2 * 1024**3
DASK_CONNECT_TIMEOUT = "10s"  # --scheduler: how long to try to reach it

# safetensors dtype names <-> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    SAFETENSORS_DTYPES["F8_E5M2"] = torch.float8_e5m2
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

DTYPE_CHOICES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Hub: only these files are fetched for a repo id (weights are narrowed further at resolve time).
# README.md: its front matter's pipeline_tag goes into the output's own card (the card itself is not copied).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.tiktoken", "README.md"]
HUB_BIN_PATTERNS = ["*.bin"]

# Methods compute on sub-chunks of about this many elements, so float32 intermediates stay in
# cache and their memory is small and fixed, whatever the size of the chunk read from disk.
SUB_CHUNK_ELEMENTS = 1 << 18
# Global passes only histogram their sub-chunks: bigger ones amortise the fixed cost of the bins.
PASS_SUB_FACTOR = 4

# No single read or output buffer is larger than this, even under a large --max-memory: glibc
# serves allocations below its 32 MiB mmap ceiling from reusable heap memory, while larger ones
# are fresh mappings whose page faults cost more than the reads themselves (0.7 vs 4 GB/s here).
PIECE_BYTES = 24 * 1024 * 1024

# Statistics stores (SPEC §3, §6): format marker written (2: arrays carry chunk checksums) and
# those still read, the kinds a store may hold, and the bytes of one Zarr chunk (whole rows).
# Chunks of ~1 MiB keep a row-range read within ~2 MiB of what it needs.
STATS_FORMAT = 3  # 3: shared input Grams stored once, with an alias per weight (root attribute 'aliases')
STATS_FORMATS_READ = (1, 2, 3)
STATS_KINDS = ("fisher", "gram_in", "gram_out", "fisher_block")
STATS_CHUNK_BYTES = 1 << 20
# Kinds with the parameter's own shape, read by the same rows as the block; the others
# (matrices per parameter) are read whole, once per block.
ROW_KINDS = ("fisher",)

SWEEP_JSON = "sweep.json"  # a sweep directory's record of its candidates, metrics and choice
SWEEP_PLOT = "sweep.png"  # the selected metric against each swept parameter
