/*
 * spank_p2pcast: run a Slurm job's tasks in a container image that p2pcast
 * broadcast to the job's nodes.
 *
 *   srun|sbatch|salloc --ch-image=NAME[:TAG] [--ch-mount=SRC:DST[,SRC:DST...]]
 *
 * Submission (srun/sbatch/salloc, "local"/"allocator" context): the values
 * (or $P2PCAST_CH_IMAGE, $P2PCAST_CH_MOUNT) are checked against the grammar
 * of p2pcast/jobspec.py, optionally the image is looked up with
 * `p2pcast inspect`, and they are handed to the Prolog of every node with
 * spank_job_control_setenv() as SPANK_CH_IMAGE / SPANK_CH_MOUNT.
 *
 * Prolog (not here): the node's p2pcastd broadcasts and stages the image and
 * writes the job record RUN_DIR/jobs/JOBID/{image,root,mounts,error}.
 *
 * Each task ("remote" context, in the task process as the user, just before
 * Slurm would exec the command): read the record and exec
 *     ch-run [-b SRC:DST ...] ROOT -- ARGV...
 * with the step's environment. The batch script itself is not wrapped; the
 * srun steps inside it are. A record that says staging failed fails the step
 * with that message, never the node.
 *
 * plugstack.conf:
 *   required /usr/local/lib/slurm/spank_p2pcast.so [ch_run=/usr/bin/ch-run]
 *       [run_dir=/run/p2pcast] [check_image=/usr/local/bin/p2pcast]
 *       [origin=URL] [check_timeout=30]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <pwd.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(p2pcast, 1);

/* Limits: the same values as p2pcast/jobspec.py (a test compares them). */
#define MAX_NAME_LEN 1024   /* limits.MAX_NAME_LENGTH: S3 keys are <= 1024 bytes */
#define MAX_TAG_LEN 128     /* names._TAG */
#define MAX_IMAGE_SPEC (MAX_NAME_LEN + 1 + MAX_TAG_LEN)
#define MAX_MOUNTS 64       /* bind mounts per job: a handful in practice */
#define MAX_PATH_LEN 4096   /* PATH_MAX: the kernel refuses longer paths anyway */
#define MAX_MOUNT_SPEC 16384 /* the value travels in the job's environment */
/* One line of the record's error file: jobrecord.MAX_ERROR_CHARS (1000) fits. */
#define MAX_ERROR_LINE 2048
/* ch-run arguments besides the step's: ch-run, -b x MAX_MOUNTS, root, --. */
#define EXTRA_ARGS (4 + 2 * MAX_MOUNTS)
/* Bytes of `p2pcast inspect` stderr kept for the message: one line matters. */
#define MAX_CHECK_OUTPUT 4096
/* An image lookup at the origin takes well under a second; a stuck origin
 * must not hold up sbatch for long (the Prolog checks again anyway). */
#define DEFAULT_CHECK_TIMEOUT_S 30
#define MAX_CHECK_TIMEOUT_S 600

#ifndef SLURM_BATCH_SCRIPT
#define SLURM_BATCH_SCRIPT 0xfffffffb
#endif
#ifndef SLURM_EXTERN_CONT
#define SLURM_EXTERN_CONT 0xfffffffc
#endif

/* Exit status of `p2pcast inspect` for a user error (p2pcast.errors.UserError). */
#define P2PCAST_EXIT_USER_ERROR 2
/* How the p2pcast command starts its one-line error messages (p2pcast/cli.py). */
#define CLI_ERROR_PREFIX "p2pcast: error: "

/* Room left in a PATH_MAX buffer for "/jobs/<job id>/<file>" after the run dir. */
#define RUN_DIR_MAX (PATH_MAX - 64)

static struct {
    char ch_run[PATH_MAX];
    char run_dir[RUN_DIR_MAX];
    char check_image[PATH_MAX]; /* empty: no lookup at submission */
    char origin[PATH_MAX];      /* empty: p2pcast's own default */
    int check_timeout;
} conf;

/* Option values; the callbacks may run more than once (twice per step in
 * remote context), so they only overwrite these. */
static char opt_image[MAX_IMAGE_SPEC + 1];
static char opt_mount[MAX_MOUNT_SPEC + 1];
static int have_image;
static int have_mount;

/* ---- value checks: exported for the test suite (tests/test_spank_plugin.py) -- */

static int fail(char *why, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Put the reason for a refusal in why[len]; return -1. */
static int fail(char *why, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (why && len) {
        va_start(ap, fmt);
        vsnprintf(why, len, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static int is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static int is_name_char(char c)
{
    return is_alnum(c) || c == '.' || c == '_' || c == '-';
}

/* NAME[:TAG] as p2pcast/names.py accepts it, and no URL (jobspec.parse_image). */
int p2pcast_check_image(const char *s, char *why, size_t len)
{
    size_t n = strlen(s), name_len;
    const char *colon, *p, *seg;

    if (n == 0)
        return fail(why, len, "empty image name");
    if (n > MAX_IMAGE_SPEC)
        return fail(why, len, "image name longer than %d characters", MAX_IMAGE_SPEC);
    if (strstr(s, "://"))
        return fail(why, len, "'%s': give NAME[:TAG]; images come from the site's origin", s);
    colon = strchr(s, ':');
    name_len = colon ? (size_t)(colon - s) : n;
    if (colon) {
        const char *tag = colon + 1;
        size_t tag_len = strlen(tag);
        if (tag_len == 0)
            return fail(why, len, "'%s': empty tag after ':'", s);
        if (strchr(tag, ':'))
            return fail(why, len, "'%s': more than one ':'", s);
        if (tag_len > MAX_TAG_LEN || !(is_alnum(tag[0]) || tag[0] == '_'))
            return fail(why, len, "'%s': the tag must be 1-128 letters, digits, '.', '_' or "
                        "'-', not starting with '.' or '-'", s);
        for (p = tag; *p; p++)
            if (!is_name_char(*p))
                return fail(why, len, "'%s': bad character in the tag", s);
    }
    if (name_len == 0)
        return fail(why, len, "'%s': empty image name", s);
    if (name_len > MAX_NAME_LEN)
        return fail(why, len, "image name longer than %d characters", MAX_NAME_LEN);
    if (s[0] == '/')
        return fail(why, len, "'%s': the name must not start with '/'", s);
    seg = s;
    for (p = s; p <= s + name_len; p++) {
        if (p == s + name_len || *p == '/') {
            if (p == seg)
                return fail(why, len, "'%s': empty path segment", s);
            if (!is_alnum(*seg))
                return fail(why, len, "'%s': every segment must start with a letter or digit", s);
            seg = p + 1;
        } else if (!is_name_char(*p)) {
            return fail(why, len, "'%s': only letters, digits, '.', '_', '-' and '/' allowed", s);
        }
    }
    return 0;
}

/* One absolute path of a mount (jobspec._check_path); [p, p+n) of `item`. */
static int check_path(const char *p, size_t n, const char *what, char *why, size_t len)
{
    size_t i, start;
    int only_slashes = 1;

    if (n == 0 || p[0] != '/')
        return fail(why, len, "%s is not an absolute path", what);
    if (n > MAX_PATH_LEN)
        return fail(why, len, "%s is longer than %d bytes", what, MAX_PATH_LEN);
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c < 0x20 || c == 0x7f)
            return fail(why, len, "%s contains a control character", what);
        if (c != '/')
            only_slashes = 0;
    }
    if (only_slashes)
        return fail(why, len, "%s must not be '/'", what);
    for (start = 0; start <= n; start = i + 1) {
        for (i = start; i < n && p[i] != '/'; i++)
            ;
        if (i - start == 2 && p[start] == '.' && p[start + 1] == '.')
            return fail(why, len, "%s contains '..'", what);
    }
    return 0;
}

/* SRC:DST[,SRC:DST...] as jobspec.parse_mounts accepts it; "" is no mounts. */
int p2pcast_check_mounts(const char *s, char *why, size_t len)
{
    size_t n = strlen(s), count = 1;
    const char *item, *end, *colon, *p;

    if (n > MAX_MOUNT_SPEC)
        return fail(why, len, "--ch-mount longer than %d bytes", MAX_MOUNT_SPEC);
    if (n == 0)
        return 0;
    for (p = s; *p; p++)
        count += (*p == ',');
    if (count > MAX_MOUNTS)
        return fail(why, len, "--ch-mount asks for more than %d mounts", MAX_MOUNTS);
    for (item = s;; item = end + 1) {
        end = strchr(item, ',');
        if (!end)
            end = s + n;
        colon = memchr(item, ':', (size_t)(end - item));
        if (!colon || memchr(colon + 1, ':', (size_t)(end - colon - 1)))
            return fail(why, len, "'%s': expected SRC:DST (one ':', no ':' or ',' in paths)", s);
        if (check_path(item, (size_t)(colon - item), "SRC", why, len) ||
            check_path(colon + 1, (size_t)(end - colon - 1), "DST", why, len))
            return -1;
        if (*end == '\0')
            break;
    }
    return 0;
}

/* ---- options ---------------------------------------------------------------- */

static int set_image(const char *value, const char *from)
{
    char why[256];

    if (!value || p2pcast_check_image(value, why, sizeof(why))) {
        slurm_error("p2pcast: %s: bad image: %s", from, value ? why : "missing value");
        return -1;
    }
    snprintf(opt_image, sizeof(opt_image), "%s", value);
    have_image = 1;
    return 0;
}

static int set_mount(const char *value, const char *from)
{
    char why[256];

    if (!value || p2pcast_check_mounts(value, why, sizeof(why))) {
        slurm_error("p2pcast: %s: %s", from, value ? why : "missing value");
        return -1;
    }
    snprintf(opt_mount, sizeof(opt_mount), "%s", value);
    have_mount = 1;
    return 0;
}

static int cb_image(int val, const char *optarg, int remote)
{
    (void)val;
    (void)remote;
    return set_image(optarg, "--ch-image");
}

static int cb_mount(int val, const char *optarg, int remote)
{
    (void)val;
    (void)remote;
    return set_mount(optarg, "--ch-mount");
}

static struct spank_option options[] = {
    {"ch-image", "NAME[:TAG]",
     "[p2pcast] Run the tasks in this container image (Charliecloud ch-run), broadcast "
     "to the job's nodes by p2pcast before the job starts. Default: $P2PCAST_CH_IMAGE.",
     1, 0, cb_image},
    {"ch-mount", "SRC:DST[,SRC:DST...]",
     "[p2pcast] Bind host directory SRC at DST in the image (absolute paths, no ',' "
     "or ':' in them; DST is created in unpacked images). Default: $P2PCAST_CH_MOUNT.",
     1, 0, cb_mount},
};

static int parse_args(int ac, char **av)
{
    int i;

    snprintf(conf.ch_run, sizeof(conf.ch_run), "%s", "/usr/bin/ch-run");
    snprintf(conf.run_dir, sizeof(conf.run_dir), "%s", "/run/p2pcast");
    conf.check_image[0] = conf.origin[0] = '\0';
    conf.check_timeout = DEFAULT_CHECK_TIMEOUT_S;
    for (i = 0; i < ac; i++) {
        const char *a = av[i];
        char *target = NULL;
        const char *value = strchr(a, '=');
        size_t size;

        if (!value) {
            slurm_error("p2pcast: plugstack.conf argument '%s' is not KEY=VALUE", a);
            return -1;
        }
        value++;
        if (!strncmp(a, "ch_run=", 7))
            target = conf.ch_run;
        else if (!strncmp(a, "run_dir=", 8))
            target = conf.run_dir;
        else if (!strncmp(a, "check_image=", 12))
            target = conf.check_image;
        else if (!strncmp(a, "origin=", 7))
            target = conf.origin;
        else if (!strncmp(a, "check_timeout=", 14)) {
            char *end;
            long t = strtol(value, &end, 10);
            if (*end || t < 1 || t > MAX_CHECK_TIMEOUT_S) {
                slurm_error("p2pcast: check_timeout=%s: expected 1-600 seconds", value);
                return -1;
            }
            conf.check_timeout = (int)t;
            continue;
        } else {
            slurm_error("p2pcast: unknown plugstack.conf argument '%s' (known: ch_run, run_dir, "
                        "check_image, origin, check_timeout)", a);
            return -1;
        }
        size = target == conf.run_dir ? sizeof(conf.run_dir) : PATH_MAX;
        if (strlen(value) >= size) {
            slurm_error("p2pcast: plugstack.conf argument '%.40s...' is too long", a);
            return -1;
        }
        snprintf(target, size, "%s", value);
    }
    return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    size_t i;

    if (parse_args(ac, av))
        return -1;
    /* In slurmd itself (and its Prolog/Epilog) there is nothing to parse. */
    if (ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE && ctx != S_CTX_ALLOCATOR)
        return 0;
    for (i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
        spank_err_t rc = spank_option_register(sp, &options[i]);
        if (rc != ESPANK_SUCCESS) {
            slurm_error("p2pcast: cannot register --%s: %s", options[i].name,
                        spank_strerror(rc));
            return -1;
        }
    }
    return 0;
}

/* ---- submission: the image lookup ------------------------------------------- */

/* Run `p2pcast inspect NAME --json [--origin URL]`; 0 unless it says the image
 * does not exist (exit 2). Anything else (origin down, p2pcast missing, too
 * slow) only warns: the Prolog finds out for sure, without draining. */
static int check_image_exists(const char *image)
{
    int pipefd[2], status = 0, timed_out = 0;
    char out[MAX_CHECK_OUTPUT];
    size_t used = 0;
    pid_t pid;
    time_t deadline = time(NULL) + conf.check_timeout;
    char *argv[] = {conf.check_image, "inspect", (char *)image, "--json",
                    conf.origin[0] ? "--origin" : NULL, conf.origin, NULL};

    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        slurm_error("p2pcast: cannot check image %s: pipe: %m", image);
        return 0;
    }
    pid = fork();
    if (pid < 0) {
        close(pipefd[0]);
        close(pipefd[1]);
        slurm_error("p2pcast: cannot check image %s: fork: %m", image);
        return 0;
    }
    if (pid == 0) { /* child: async-signal-safe calls only */
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, STDIN_FILENO);
            dup2(null, STDOUT_FILENO);
        }
        dup2(pipefd[1], STDERR_FILENO);
        execv(conf.check_image, argv);
        _exit(127);
    }
    close(pipefd[1]);
    for (;;) {
        struct pollfd pfd = {pipefd[0], POLLIN, 0};
        int left = (int)(deadline - time(NULL));
        ssize_t got;
        char sink[512];

        if (left <= 0) {
            timed_out = 1;
            break;
        }
        if (poll(&pfd, 1, left * 1000) <= 0) {
            if (errno == EINTR)
                continue;
            timed_out = 1;
            break;
        }
        if (used < sizeof(out) - 1)
            got = read(pipefd[0], out + used, sizeof(out) - 1 - used);
        else
            got = read(pipefd[0], sink, sizeof(sink));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        if (used < sizeof(out) - 1)
            used += (size_t)got;
    }
    close(pipefd[0]);
    if (timed_out)
        kill(pid, SIGKILL);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    out[used] = '\0';
    while (used && (out[used - 1] == '\n' || out[used - 1] == ' '))
        out[--used] = '\0';
    if (timed_out) {
        slurm_info("p2pcast: image %s not checked: no answer in %d s", image, conf.check_timeout);
        return 0;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return 0;
    if (WIFEXITED(status) && WEXITSTATUS(status) == P2PCAST_EXIT_USER_ERROR) {
        const char *line = strrchr(out, '\n');
        line = line ? line + 1 : out;
        if (!strncmp(line, CLI_ERROR_PREFIX, strlen(CLI_ERROR_PREFIX)))
            line += strlen(CLI_ERROR_PREFIX);
        slurm_error("p2pcast: --ch-image %s: %s", image, line);
        return -1;
    }
    slurm_info("p2pcast: image %s not checked now (%s): the job's Prolog will", image,
               used ? out : "p2pcast inspect failed");
    return 0;
}

static int submission_post_opt(spank_t sp)
{
    /* srun inside an allocation starts a step: the Prolog ran at allocation. */
    int in_allocation = spank_context() == S_CTX_LOCAL && getenv("SLURM_JOB_ID") != NULL;
    const char *env;
    spank_err_t rc;

    if (!have_image && (env = getenv("P2PCAST_CH_IMAGE")) && *env &&
        set_image(env, "P2PCAST_CH_IMAGE"))
        return -1;
    if (!have_mount && (env = getenv("P2PCAST_CH_MOUNT")) && *env &&
        set_mount(env, "P2PCAST_CH_MOUNT"))
        return -1;
    if (have_mount && !have_image) {
        slurm_error("p2pcast: --ch-mount needs --ch-image");
        return -1;
    }
    if (!have_image || in_allocation)
        return 0;
    if (conf.check_image[0] && check_image_exists(opt_image))
        return -1;
    rc = spank_job_control_setenv(sp, "CH_IMAGE", opt_image, 1);
    if (rc == ESPANK_SUCCESS && have_mount)
        rc = spank_job_control_setenv(sp, "CH_MOUNT", opt_mount, 1);
    if (rc != ESPANK_SUCCESS) {
        slurm_error("p2pcast: cannot pass --ch-image to the Prolog: %s", spank_strerror(rc));
        return -1;
    }
    return 0;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();

    (void)ac;
    (void)av;
    if (ctx == S_CTX_LOCAL || ctx == S_CTX_ALLOCATOR)
        return submission_post_opt(sp);
    return 0;
}

/* ---- the task: exec ch-run --------------------------------------------------- */

/* Read one small file of the record into buf (trailing newline dropped);
 * -1 with errno if it cannot be read. */
static int read_small(const char *dir, const char *name, char *buf, size_t len)
{
    char path[PATH_MAX];
    ssize_t got;
    size_t used = 0;
    int fd;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return -1;
    while (used < len - 1 && (got = read(fd, buf + used, len - 1 - used)) != 0) {
        if (got < 0) {
            if (errno == EINTR)
                continue;
            close(fd);
            return -1;
        }
        used += (size_t)got;
    }
    close(fd);
    buf[used] = '\0';
    while (used && buf[used - 1] == '\n')
        buf[--used] = '\0';
    return 0;
}

/* NAME[:TAG] with the default tag, as the daemon records it. */
static void normalise_image(const char *in, char *out, size_t len)
{
    snprintf(out, len, "%s%s", in, strchr(in, ':') ? "" : ":latest");
}

/* The environment of the step plus USER, which ch-run requires. */
static char **task_env(char **env, char *user_var, size_t len)
{
    size_t n = 0, i;
    char **out;
    struct passwd *pw;

    for (; env && env[n]; n++)
        if (!strncmp(env[n], "USER=", 5))
            return env;
    pw = getpwuid(getuid());
    snprintf(user_var, len, "USER=%s", pw ? pw->pw_name : "nobody");
    out = calloc(n + 2, sizeof(char *));
    if (!out)
        return env;
    for (i = 0; i < n; i++)
        out[i] = env[i];
    out[n] = user_var;
    return out;
}

/* Exit status of a task that cannot run in its image. */
#define TASK_FAILED 1

/* End the task here, in its own process, just before it would exec its
 * command: returning -1 fails the step only where plugstack.conf says
 * "required"; under "optional" Slurm logs it and runs the command on the host,
 * outside the image the user asked for. */
static int fail_task(void)
{
    _exit(TASK_FAILED);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    uint32_t job_id = 0, step_id = 0;
    int argc = 0, nargs = 0, n_mounts = 0;
    char **argv = NULL, **env = NULL, **args;
    char dir[PATH_MAX], root[PATH_MAX], probe[2 * PATH_MAX], line[MAX_ERROR_LINE];
    char mounts[MAX_MOUNT_SPEC + MAX_MOUNTS + 1], want[MAX_IMAGE_SPEC + 16];
    char user_var[300], *cursor, *next;
    struct stat st;
    ssize_t n;
    int i;

    (void)ac;
    (void)av;
    if (!spank_remote(sp))
        return 0;
    if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS) {
        slurm_error("p2pcast: cannot get the job and step id");
        return -1;
    }
    /* The batch script runs on the node as usual; its srun steps run in the image. */
    if (step_id == SLURM_BATCH_SCRIPT || step_id == SLURM_EXTERN_CONT)
        return 0;
    snprintf(dir, sizeof(dir), "%s/jobs/%u", conf.run_dir, job_id);
    if (lstat(dir, &st) < 0) {
        if (!have_image)
            return 0; /* not a container job */
        slurm_error("p2pcast: --ch-image %s: no staging record %s: images are staged when the "
                    "job starts; give --ch-image to sbatch/salloc (is the p2pcast Prolog "
                    "configured, with PrologFlags=Alloc?)", opt_image, dir);
        return fail_task();
    }
    if (read_small(dir, "error", line, sizeof(line)) == 0) {
        slurm_error("p2pcast: %s", line);
        return fail_task();
    }
    snprintf(probe, sizeof(probe), "%s/root", dir);
    n = readlink(probe, root, sizeof(root) - 1);
    if (n <= 0) {
        slurm_error("p2pcast: incomplete staging record %s: no root", dir);
        return fail_task();
    }
    root[n] = '\0';
    if (have_image && read_small(dir, "image", line, sizeof(line)) == 0) {
        normalise_image(opt_image, want, sizeof(want));
        if (strcmp(want, line)) {
            slurm_error("p2pcast: this step asks for --ch-image %s but job %u staged %s: "
                        "one image per job", opt_image, job_id, line);
            return fail_task();
        }
    }
    if (read_small(dir, "mounts", mounts, sizeof(mounts)) < 0)
        mounts[0] = '\0';
    if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 ||
        spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS) {
        slurm_error("p2pcast: cannot get the step's command and environment");
        return fail_task();
    }
    args = calloc((size_t)argc + EXTRA_ARGS + 1, sizeof(char *));
    if (!args) {
        slurm_error("p2pcast: out of memory");
        return fail_task();
    }
    args[nargs++] = conf.ch_run;
    for (cursor = mounts; *cursor && n_mounts < MAX_MOUNTS; cursor = next) {
        next = strchr(cursor, '\n');
        if (next)
            *next++ = '\0';
        else
            next = cursor + strlen(cursor);
        if (!*cursor)
            continue;
        args[nargs++] = "-b";
        args[nargs++] = cursor;
        n_mounts++;
    }
    args[nargs++] = root;
    args[nargs++] = "--";
    for (i = 0; i < argc; i++)
        args[nargs++] = argv[i];
    /* srun turns the command into an absolute path found on the submission
     * host; if the image has no such file, let ch-run search the image's
     * PATH for the bare name instead. */
    if (argv[0][0] == '/' &&
        (size_t)snprintf(probe, sizeof(probe), "%s%s", root, argv[0]) < sizeof(probe) &&
        stat(probe, &st) < 0 && strrchr(argv[0], '/')[1])
        args[nargs - argc] = strrchr(argv[0], '/') + 1;
    execve(conf.ch_run, args, task_env(env, user_var, sizeof(user_var)));
    slurm_error("p2pcast: cannot run %s: %m", conf.ch_run);
    free(args);
    return fail_task();
}
