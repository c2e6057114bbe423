"""The networks, as pure nn.Modules over tensors: the conditional U-Net, its blocks and attention.
Imports no schedule, sampler, loss or encoder."""
