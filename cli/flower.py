"""The Celery app Flower monitors: `celery -A cli.flower flower`.

It knows every model's queues, so Flower's broker page shows their lengths
(the workers' own queues are learned from the workers as they come online).
"""

from shared.celery_app import make_celery
from shared.settings import get_settings

app = make_celery(get_settings())
