/*
 * A stand-in for slurmstepd to test slurm_spank_task_init of spank_p2pcast.so
 * without a cluster: provides the spank_* and slurm_* symbols the plugin
 * uses, loads it in remote context and calls it as the task would be.
 *
 *   spank_harness PLUGIN JOBID STEPID [--image NAME] ARG... -- COMMAND...
 *
 * ARGs are the plugstack.conf arguments. If task_init execs ch-run, COMMAND
 * runs in the image; if it returns, the harness prints "returned RC" and
 * exits 3 (RC -1) or 0.
 */
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <slurm/spank.h>

extern char **environ;

static uint32_t job_id, step_id;
static int cmd_argc;
static char **cmd_argv;
static struct spank_option *registered[8];
static int n_registered;

spank_context_t spank_context(void) { return S_CTX_REMOTE; }
int spank_remote(spank_t sp) { (void)sp; return 1; }
const char *spank_strerror(spank_err_t err) { (void)err; return "harness error"; }

spank_err_t spank_option_register(spank_t sp, struct spank_option *opt)
{
    (void)sp;
    if (n_registered < 8)
        registered[n_registered++] = opt;
    return ESPANK_SUCCESS;
}

spank_err_t spank_job_control_setenv(spank_t sp, const char *n, const char *v, int o)
{
    (void)sp; (void)n; (void)v; (void)o;
    return ESPANK_NOT_LOCAL;
}

spank_err_t spank_get_item(spank_t sp, spank_item_t item, ...)
{
    va_list ap;
    spank_err_t rc = ESPANK_SUCCESS;

    (void)sp;
    va_start(ap, item);
    switch (item) {
    case S_JOB_ID:
        *va_arg(ap, uint32_t *) = job_id;
        break;
    case S_JOB_STEPID:
        *va_arg(ap, uint32_t *) = step_id;
        break;
    case S_JOB_ARGV:
        *va_arg(ap, int *) = cmd_argc;
        *va_arg(ap, char ***) = cmd_argv;
        break;
    case S_JOB_ENV:
        *va_arg(ap, char ***) = environ;
        break;
    default:
        rc = ESPANK_BAD_ARG;
    }
    va_end(ap);
    return rc;
}

static void say(const char *level, const char *fmt, va_list ap)
{
    fprintf(stderr, "%s: ", level);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void slurm_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    say("error", fmt, ap);
    va_end(ap);
}

void slurm_info(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    say("info", fmt, ap);
    va_end(ap);
}

int main(int argc, char **argv)
{
    void *lib;
    spank_f *init, *task_init;
    char *image = NULL, *args[16];
    int i, nargs = 0, rc;

    if (argc < 5) {
        fprintf(stderr, "usage: %s PLUGIN JOBID STEPID [--image N] ARG... -- CMD...\n", argv[0]);
        return 2;
    }
    job_id = (uint32_t)strtoul(argv[2], NULL, 10);
    step_id = (uint32_t)strtoul(argv[3], NULL, 0);
    for (i = 4; i < argc && strcmp(argv[i], "--"); i++) {
        if (!strcmp(argv[i], "--image") && i + 1 < argc)
            image = argv[++i];
        else if (nargs < 16)
            args[nargs++] = argv[i];
    }
    cmd_argc = argc - i - 1;
    cmd_argv = argv + i + 1;
    lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    init = (spank_f *)dlsym(lib, "slurm_spank_init");
    task_init = (spank_f *)dlsym(lib, "slurm_spank_task_init");
    if (!init || !task_init || init(NULL, nargs, args))
        return 2;
    if (image) /* the option given on this step: its callback runs in remote context */
        for (i = 0; i < n_registered; i++)
            if (!strcmp(registered[i]->name, "ch-image") && registered[i]->cb(0, image, 1))
                return 2;
    rc = task_init(NULL, 0, NULL);
    printf("returned %d\n", rc);
    return rc ? 3 : 0;
}
