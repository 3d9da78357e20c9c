"""ECG signals to printouts: record readers (WFDB, .mat, .npz, PTB-XL labels) and the rasteriser."""
