"""One module per subcommand; COMMANDS is what `ksmpreload` offers."""

from .attach import attach, detach
from .compare import compare
from .demo import demo
from .doctor import doctor
from .exporter import exporter
from .governor import governor
from .ksm import ksm
from .report import report
from .status import status
from .systemd import systemd
from .top import top

COMMANDS = [status, top, ksm, report, doctor, attach, detach, compare, exporter, governor, systemd, demo]
