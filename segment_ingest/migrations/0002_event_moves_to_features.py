# Event now belongs to features (features.0002); the table is not touched here.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('segment_ingest', '0001_initial'),
        ('features', '0002_event_moves_from_segment_ingest'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name='Event')],
            database_operations=[],
        ),
    ]
