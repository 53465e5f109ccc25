"""Pure jnp math, no modules and no configuration: FIR and FFT convolution (``fir``), the modal
LI filter and its recurrences (``modal``), attention partials and their log-sum-exp merge
(``attention``), token log-likelihoods (``loss``). Kernels, modules and drivers build on these.
"""
