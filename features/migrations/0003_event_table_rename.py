# The events table takes its owner's name: segment_ingest_event -> features_event.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('features', '0002_event_moves_from_segment_ingest'),
        ('segment_ingest', '0002_event_moves_to_features'),
    ]

    operations = [
        migrations.AlterModelTable(name='event', table=None),
    ]
