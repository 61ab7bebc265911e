"""tao-cli: TAO's `tao model <net> <action>` launcher, pip-installable."""
__version__ = "0.1.0"
