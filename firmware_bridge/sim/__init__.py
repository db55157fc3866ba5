"""Simulated hardware: the synthetic OMIS sample, the simulated firmware and camera."""
