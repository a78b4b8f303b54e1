from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("features", "0005_reprocessingjob_failures_and_invalid_reasons"),
    ]

    operations = [
        migrations.AddField(
            model_name="event",
            name="voided_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="event",
            name="void_reason",
            field=models.CharField(blank=True, db_default="", default="", max_length=500),
        ),
        migrations.AlterField(
            model_name="event",
            name="status",
            field=models.CharField(
                choices=[
                    ("mapped", "Mapped"),
                    ("unmapped", "Unmapped"),
                    ("processed", "Processed"),
                    ("voided", "Voided"),
                ],
                max_length=16,
            ),
        ),
        migrations.AddConstraint(
            model_name="event",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("status", "voided"), ("voided_at__isnull", False)),
                    models.Q(models.Q(("status", "voided"), _negated=True), ("voided_at__isnull", True)),
                    _connector="OR",
                ),
                name="event_voided_iff_voided_at",
            ),
        ),
    ]
