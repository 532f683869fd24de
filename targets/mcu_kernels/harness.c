/* graphopt's test harness for a generated model: reads graphopt_in.bin (a uint32 count,
 * then that many samples of every input, float32, concatenated in input order), runs the
 * model on each and writes graphopt_out.bin (the outputs, concatenated likewise). The
 * same file runs on the host and, through semihosting, on a Cortex-M under emulation. */
#include <stdio.h>

#include "model.h"

#ifdef GRAPHOPT_MODEL_IO_IN_ARENA
/* Inputs and outputs are read and written where they live, in the model's arena: the
 * harness needs no buffers of its own (the image's RAM is the model's plan). */
static const unsigned long input_sizes[] = GRAPHOPT_MODEL_INPUT_SIZES;
static const unsigned long output_sizes[] = GRAPHOPT_MODEL_OUTPUT_SIZES;

static int read_sample(FILE *in)
{
    int k;
    for (k = 0; k < GRAPHOPT_MODEL_INPUT_COUNT; ++k)
        if (fread(graphopt_model_input(k), sizeof(float), input_sizes[k], in) !=
            input_sizes[k])
            return 0;
    return 1;
}

static int run_sample(void) { return graphopt_model_invoke(); }

static int write_sample(FILE *out)
{
    int k;
    for (k = 0; k < GRAPHOPT_MODEL_OUTPUT_COUNT; ++k)
        if (fwrite(graphopt_model_output(k), sizeof(float), output_sizes[k], out) !=
            output_sizes[k])
            return 0;
    return 1;
}
#else
static float inputs[GRAPHOPT_MODEL_INPUT_FLOATS];
static float outputs[GRAPHOPT_MODEL_OUTPUT_FLOATS];

static int read_sample(FILE *in)
{
    return fread(inputs, sizeof(float), GRAPHOPT_MODEL_INPUT_FLOATS, in) ==
           GRAPHOPT_MODEL_INPUT_FLOATS;
}

static int run_sample(void) { return graphopt_model_run_packed(inputs, outputs); }

static int write_sample(FILE *out)
{
    return fwrite(outputs, sizeof(float), GRAPHOPT_MODEL_OUTPUT_FLOATS, out) ==
           GRAPHOPT_MODEL_OUTPUT_FLOATS;
}
#endif

int main(void)
{
    unsigned long count = 0, i;
    unsigned char header[4];
    FILE *in = fopen("graphopt_in.bin", "rb"), *out;
    if (!in || fread(header, 1, 4, in) != 4) {
        printf("graphopt-harness: cannot read graphopt_in.bin\n");
        return 1;
    }
    count = header[0] | (header[1] << 8) | ((unsigned long)header[2] << 16) |
            ((unsigned long)header[3] << 24);
    out = fopen("graphopt_out.bin", "wb");
    if (!out) {
        printf("graphopt-harness: cannot write graphopt_out.bin\n");
        return 1;
    }
    for (i = 0; i < count; ++i) {
        if (!read_sample(in)) {
            printf("graphopt-harness: graphopt_in.bin ends in sample %lu\n", i);
            return 1;
        }
        if (run_sample() != 0) {
            printf("graphopt-harness: the model failed on sample %lu\n", i);
            return 1;
        }
        if (!write_sample(out)) {
            printf("graphopt-harness: cannot write sample %lu\n", i);
            return 1;
        }
    }
    fclose(in);
    if (fclose(out) != 0) {
        printf("graphopt-harness: cannot close graphopt_out.bin\n");
        return 1;
    }
    printf("graphopt-harness: ok %lu\n", count);
    return 0;
}
