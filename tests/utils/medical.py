"""Small DICOM, NIfTI and 16-bit TIFF files written on the spot (pydicom, nibabel, PIL): no downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    slope: float | None = None,
    intercept: float | None = None,
    center: float | list[float] | None = None,
    width: float | list[float] | None = None,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
) -> Path:
    """A secondary-capture DICOM of ``pixels`` (uint16 or int16 ``[rows, columns]``), with the
    rescale and window tags given."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "synthetic"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if center is not None and width is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    data = np.ascontiguousarray(pixels).tobytes()
    ds.PixelData = data * frames
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(
    path: Path, pixels: np.ndarray, *, slope: float | None = None, inter: float | None = None
) -> Path:
    """A NIfTI-1 (``.nii`` or ``.nii.gz``) holding ``pixels`` ``[rows, columns]`` as a 2D slice:
    stored as ``(x, y)`` = ``(columns, rows)``, the NIfTI axis order."""
    import nibabel as nib

    data = pixels.T if pixels.ndim == 2 else pixels
    img = nib.Nifti1Image(np.ascontiguousarray(data), np.eye(4))
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_tiff16(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint16)).save(path)
    return path


def ramp(rows: int = 24, cols: int = 20, scale: int = 37) -> np.ndarray:
    """A uint16 ramp with distinct values, not square (so transposed axes show)."""
    return (np.arange(rows * cols).reshape(rows, cols) * scale % 4000).astype(np.uint16)


def disc_mask(rows: int = 24, cols: int = 20, label: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols]
    return ((((yy - rows / 2) / (rows / 3)) ** 2 + ((xx - cols / 2) / (cols / 3)) ** 2) < 1).astype(
        np.uint16
    ) * label


# ---- decompression bombs inside a decoder: small on disk, large once inflated


def write_deflated_dicom(
    path: Path, pixels: np.ndarray, *, padding: int = 0, sequences: bool = False
) -> Path:
    """A DICOM of ``pixels`` in the Deflated Explicit VR Little Endian transfer syntax (the whole
    dataset deflated after the meta group) with ``padding`` zero bytes of DataSetTrailingPadding
    beside the image: zeros deflate about 1000:1, so 24 MB of padding is a 24 KB file. ``sequences``:
    nested sequences, of undefined and defined length, before the image tags."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    write_dicom(path, pixels)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if padding:
        ds.add_new(0xFFFCFFFC, "OB", bytes(padding))
    if sequences:  # nested sequences before the image tags, of undefined and of defined length
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        inner = Dataset()
        inner.CodeValue, inner.CodeMeaning = "T-D3000", "Chest"
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3.4"
        item.PurposeOfReferenceCodeSequence = Sequence([inner])
        item["PurposeOfReferenceCodeSequence"].is_undefined_length = False
        item.is_undefined_length_sequence_item = True
        ds.ReferencedImageSequence = Sequence([item, Dataset()])
        ds["ReferencedImageSequence"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti_bomb(path: Path, pixels: np.ndarray, *, extension: int) -> Path:
    """A gzipped NIfTI of ``pixels`` carrying an ``extension``-byte header extension of zeros, which
    nibabel reads into memory with the header: a small ``.nii.gz`` that inflates past any budget."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(pixels.T), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, bytes(extension)))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path
