"""What makes a step or a sample faster, in one place: CUDA graphs of the training update and of the sampler's
network call (``speed.cuda_graphs``), the arithmetic precision of training and sampling (``speed.precision``), and
the census of dispatched operators and host reads that measures them without a GPU (``speed.dispatch_census``)."""
