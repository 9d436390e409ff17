"""Peak resident memory of the PyTorch-free path: SmolLM2-135M-Instruct Q4_1 at a 2,048-token context."""
import json
import subprocess
import sys

SCRIPT = r"""
import json, sys
sys.modules["torch"] = None
import numpy as np
from smolvlm_fast import AutoModelForCausalLM
from smolvlm_fast.engine.engine import Request, generate
from smolvlm_fast.config import SamplingParams

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], backend="numpy")
prompt = np.random.default_rng(0).integers(100, 40000, 2048 - 8).tolist()
seq = generate(model.model, [Request(prompt, SamplingParams(max_new_tokens=8))])[0]
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak (the pytest process here)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mb": peak_kb / 1024, "new": len(seq.output_ids)}))
"""


def test_peak_memory_under_400_mb_at_2048_tokens(smollm2_gguf):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm2_gguf)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["new"] == 8
    assert result["peak_mb"] < 400, f"peak resident memory {result['peak_mb']:.0f} MB"
