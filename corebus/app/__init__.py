"""The application: the command line, config runs, Ray runs and the run report."""
