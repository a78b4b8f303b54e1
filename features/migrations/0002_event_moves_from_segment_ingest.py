# The Event model moves from segment_ingest (the HTTP edge) to features, the one writer of
# events and usage. State only: the table stays as it is, renamed in 0003.

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('features', '0001_initial'),
        ('segment_ingest', '0001_initial'),
        ('kana', '0001_initial'),
        ('users', '0002_importjob'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='Event',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('message_id', models.CharField(max_length=100)),
                        ('type', models.CharField(choices=[('identify', 'Identify'), ('track', 'Track'), ('page', 'Page'), ('screen', 'Screen'), ('group', 'Group'), ('alias', 'Alias')], max_length=16)),
                        ('name', models.CharField(blank=True, default='', max_length=255)),
                        ('external_user_id', models.CharField(blank=True, default='', max_length=255)),
                        ('payload', models.JSONField()),
                        ('occurred_at', models.DateTimeField()),
                        ('received_at', models.DateTimeField()),
                        ('status', models.CharField(choices=[('mapped', 'Mapped'), ('unmapped', 'Unmapped'), ('processed', 'Processed')], max_length=16)),
                        ('unmapped_reason', models.CharField(blank=True, choices=[('no_matching_rule', 'No Matching Rule'), ('unknown_feature', 'Unknown Feature'), ('invalid_delta', 'Invalid Delta')], default='', max_length=32)),
                        ('warnings', models.JSONField(blank=True, default=list)),
                        ('user', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='events', to='users.enduser')),
                        ('workspace', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='+', to='kana.workspace')),
                    ],
                    options={
                        'db_table': 'segment_ingest_event',
                        'indexes': [
                            models.Index(fields=['workspace', 'status', 'id'], name='event_ws_status_idx'),
                            models.Index(fields=['workspace', 'user', '-occurred_at'], name='event_ws_user_idx'),
                            models.Index(fields=['workspace', '-received_at'], name='event_ws_received_idx'),
                        ],
                        'constraints': [
                            models.UniqueConstraint(fields=('workspace', 'message_id'), name='event_unique_message_id'),
                        ],
                    },
                ),
                migrations.AlterField(
                    model_name='usage',
                    name='event',
                    field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='usage', to='features.event'),
                ),
            ],
            database_operations=[],
        ),
    ]
