import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Two cores: keep torch to one thread so a busy neighbour cannot stall a step.
torch.set_num_threads(1)
