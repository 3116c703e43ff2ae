import pytest
import torch

from privreg.demo import data_path
from privreg.image import read_image

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def t1_slice():
    return read_image(data_path("BrainT1Slice.png"))


@pytest.fixture(scope="session")
def pd_slice():
    return read_image(data_path("BrainProtonDensitySlice.png"))


@pytest.fixture(scope="session")
def brain3d():
    return read_image(data_path("mni152_t1_4mm.nii.gz"))
