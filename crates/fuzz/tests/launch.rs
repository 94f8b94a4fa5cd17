//! Fuzzing ferrovmm's command line (the launch configuration parser).

use ferrovirt_fuzz::run;
use ferrovirt_fuzz::targets::launch::*;

#[test]
fn launch_args_fuzz() {
    run(&LAUNCH_ARGS, launch_args);
}
