"""The version of mlpot and of the deployed-file format it writes."""

__version__ = "0.1.0"
# the layout of deployed model files (metadata and calling convention); raise it when old readers would misread a new file
FORMAT_VERSION = 1
