"""seqio tasks for sira-jax: the bundled offline suite and XTREME-UP.

`import tasks` registers the offline suite (no download; see
tasks/offline_suite.py and tasks/README.md) and, when $XTREME_UP_DATA_DIR is
set, the XTREME-UP tasks (tasks/xtreme_up.py). The trainer selects tasks by
name: `tasks.get_task_or_mixture(name)`; unknown names raise a KeyError that
lists the closest registered names. After parsing gin, `tasks.register_all()`
re-registers with the gin-configured vocabulary and XTREME-UP data dir.
"""
import os

from tasks import metrics
from tasks import registry
from tasks import vocab
from tasks import xtreme_up
from tasks.registry import get_task_or_mixture
from tasks.registry import registered_names
from tasks.xtreme_up import register_xtreme_up

if os.environ.get(xtreme_up.ENV_VAR):
  register_xtreme_up()
