"""The prepared training data: what every fold needs to make its network inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inference.render import RenderParams
from training.data import Dataset, Task
from training.exceptions import ConfigError
from training.model import Preset
from training.window import Inputs, fit_inputs, image_inputs

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass
class Prepared:
    """The data, with what every fold needs to make its network inputs."""

    ds: Dataset
    task: Task
    preset: Preset
    labels: I64
    axis: F64 | None
    ys: F64 | None
    given_render: RenderParams | None
    outside_task: int

    @property
    def spectra(self) -> list[tuple[F64, F64]] | None:
        """(x, y) of every slide, or None for image datasets."""
        if self.ys is None or self.axis is None:
            return None
        return [(self.axis, y) for y in self.ys]

    def inputs_for(self, fit_idx: I64) -> Inputs:
        """Network inputs of every slide, with the window fitted on ``fit_idx`` only."""
        if self.ys is None or self.axis is None:
            if self.given_render is None:
                raise ConfigError("image dataset without render parameters")
            return image_inputs(
                [s.image for s in self.ds.slides if s.image is not None], self.given_render
            )
        return fit_inputs(
            self.axis,
            self.ys,
            self.labels,
            fit_idx,
            size=self.preset.input_size,
            representation=self.preset.representation,
        )
