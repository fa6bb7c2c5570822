import torch

# Tests run on shared CPU cores; one thread per process avoids oversubscription and keeps
# kernel timings out of the picture (tests check invariants, not speed).
torch.set_num_threads(1)
