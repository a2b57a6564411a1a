"""Test-session settings shared by every test file."""

import torch

# pytest-xdist runs 2 workers on 2 cores: one torch thread each avoids oversubscription (OpenMP barriers in
# many medium-sized ops slow down by 10x or more when threads outnumber cores).
torch.set_num_threads(1)
