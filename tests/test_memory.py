"""An estimate's extra memory stays at its floor: 1 + 2k float32 copies for k chains in flight.

Measured as the peak anonymous resident memory of a fresh process, with glibc returning freed
memory at once (``MALLOC_MMAP_THRESHOLD_``) and no transparent huge pages, on a deep MLP whose
activations are negligible (batches of 4) and whose largest weight is 1/16 of the model: the
floor plus the gradient of one weight being made is 1 + 2k + k/16, and any further copy of
the weights per chain, or a temporary of the weights' size, adds at least 1.

Only the process's own allocations count: the peak resident memory less the file-backed pages
(shared libraries' code, mapped as it is first run, more or fewer of them depending on what
the machine's page cache holds from earlier work) and with huge pages off (whether the kernel
hands them out depends on how fragmented memory is), so that what ran before cannot move it.
"""

import json

import pytest
from processes import python

pytestmark = pytest.mark.slow  # make test-fast skips it

SCRIPT = """
import ctypes, json, sys

ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: no huge pages in this process

import torch
from llc_callbacks import LLCConfig, estimate_llc


def resident(*fields):  # the sum of these fields of /proc/self/status, in bytes
    with open("/proc/self/status") as status:
        kilobytes = dict(line.split(":", 1) for line in status)
    return sum(int(kilobytes[field].split()[0]) for field in fields) * 1024


torch.manual_seed(0)
layers = [torch.nn.Linear(2048, 2048) for _ in range(16)]
model = torch.nn.Sequential(*layers)
data = [(torch.randn(4, 2048), torch.randn(4, 2048))]

def loss_fn(m, batch):
    return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

loss_fn(model, data[0]).backward()  # a training step first, as in a run
model.zero_grad(set_to_none=True)
in_flight = int(sys.argv[1])
config = LLCConfig(
    num_chains=4,
    num_burnin=1,
    num_draws=2,
    chains_in_flight=in_flight,
    mala=False,
    nbeta=1.0,
    step_size=1e-4,  # adapting measures MALA's acceptance: two more copies on those steps
)
# A first estimate of a tiny model loads the code and modules an estimate uses, so the
# measured rise is the estimate's own memory, not a lazy import's.
tiny = torch.nn.Sequential(torch.nn.Linear(8, 8))
estimate_llc(tiny, loss_fn, [(torch.randn(4, 8), torch.randn(4, 8))], config, warn=False)
size = sum(p.numel() for p in model.parameters()) * 4
before = resident("RssAnon")
estimate_llc(model, loss_fn, data, config, warn=False)
# The peak less the pages that are not anonymous, which only grow during an estimate.
peak = resident("VmHWM") - resident("RssFile", "RssShmem")
extra = (peak - before) / size
print(json.dumps({"extra": extra, "before_mb": before >> 20, "peak_mb": peak >> 20}))
"""


@pytest.mark.parametrize("in_flight", [1, 4])
def test_extra_peak_memory_is_one_anchor_and_two_copies_per_chain_in_flight(in_flight):
    done = python("-c", SCRIPT, in_flight, MALLOC_MMAP_THRESHOLD_="65536")
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    extra = measured["extra"]
    floor = 1 + 2 * in_flight
    # Above: the gradient of one weight while backward makes it (k/16), the noise and sums
    # in 16 MB pieces (0.06), allocator slack; below the next copy of the weights (+1).
    assert floor - 0.1 < extra < floor + 0.5, measured
