"""Data: volumes (tensorstore/HDF5), synthetic EM, partitions, sampling, recurrent FOV examples."""
