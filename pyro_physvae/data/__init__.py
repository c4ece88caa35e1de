"""Data sets as ``xarray.Dataset`` objects, stored as netCDF.

Every data set has the observations in the variable ``x`` with the leading dimension
``sequence`` and a trailing ``time`` dimension (coordinate in seconds), the true physics
parameters (when known) as variables over ``sequence``, and attributes ``system`` and
``split``. A data directory holds one file per split: ``train.nc``, ``valid.nc``, ``test.nc``.

:func:`ode_dataset` makes such data sets from any ODE (for systems defined outside the package)
and :func:`simulate_dataset` re-simulates their sequences (counterfactuals, extrapolation).
"""

from pyro_physvae.data.io import SPLITS, load_dataset, load_split, save_dataset, to_tensor
from pyro_physvae.data.synthetic import ode_dataset, simulate_dataset

__all__ = ["SPLITS", "load_dataset", "load_split", "ode_dataset", "save_dataset", "simulate_dataset",
           "to_tensor"]
