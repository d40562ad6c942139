"""Sizes shared by the lab tests."""

# florence-vl-tiny's recipe at a few images and steps, for tests that run it
MICRO = dict(train_images=6, test_images=3, batch_size=4, stage0_steps=2, stage1_steps=2, stage2_steps=2,
             stage1_vision_start_step=1)
