"""Perch's executor for Core ML ML programs: load a saved .mlpackage's MIL program and run it op by op in numpy."""
