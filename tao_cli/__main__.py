"""``python -m tao_cli`` runs the ``tao`` command."""
from tao_cli.cli import main

main()
