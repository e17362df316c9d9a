"""The ``dyn`` command line. Heavy imports (torch, matplotlib) happen inside the commands."""
