/* Decode one rectangle of a baseline or progressive JPEG to RGB, and no more of it than libjpeg must.
 *
 * A random-resized crop keeps about half of an ImageNet image. Decoding only its window saves the inverse
 * DCT, upsampling and colour conversion of every column outside it and all the work below its last row
 * (jpeg_crop_scanline, jpeg_skip_scanlines and an early jpeg_abort_decompress, libjpeg-turbo >= 1.5).
 * The rows above it must still be entropy-decoded: Huffman codes have no random access.
 *
 * The pixels are those of a whole-image decode at the same DCT method (TurboJPEG's fast integer DCT, as
 * FFCV decodes): the window is widened by one column on each side that has one, because the chroma
 * upsampler treats the window's own edges as image edges.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

struct region_error {
    struct jpeg_error_mgr manager;
    jmp_buf escape;
};

static void escape_on_error(j_common_ptr info) { longjmp(((struct region_error *)info->err)->escape, 1); }

static void stay_quiet(j_common_ptr info, int level) { (void)info; (void)level; }

/* Decodes rows [top, top + height) of the JPEG in `source` straight into `rows` (at most `capacity` bytes),
 * each row `placement[1]` pixels wide, RGB packed; the requested columns [left, left + width) start at
 * column `placement[0]` of every row. The rows are wider than asked (libjpeg starts them at an iMCU edge, and
 * one more column each side keeps the chroma upsampling that of a whole decode), and are not copied again:
 * the resize reads the window where it lies. Returns 0, or -1 when the data is not a decodable JPEG, the
 * window leaves the image or does not fit; the first height x width x 3 bytes of `rows` are then zero-filled
 * and `placement` is {0, width}, so no stale pixels reach a batch. */
int decode_jpeg_region(const unsigned char *source, unsigned long source_size, unsigned char *rows,
                       unsigned long capacity, unsigned int top, unsigned int left, unsigned int height,
                       unsigned int width, unsigned int *placement)
{
    struct jpeg_decompress_struct info;
    struct region_error error;

    info.err = jpeg_std_error(&error.manager);
    error.manager.error_exit = escape_on_error;
    error.manager.emit_message = stay_quiet;  /* warnings (a truncated file) would go to stderr */
    if (setjmp(error.escape)) {
        jpeg_destroy_decompress(&info);
        placement[0] = 0;
        placement[1] = width;
        if ((unsigned long)height * width * 3 <= capacity)
            memset(rows, 0, (size_t)height * width * 3);
        return -1;
    }
    jpeg_create_decompress(&info);
    jpeg_mem_src(&info, source, source_size);
    jpeg_read_header(&info, TRUE);
    info.out_color_space = JCS_RGB;
    info.dct_method = JDCT_IFAST;
    jpeg_start_decompress(&info);
    if (width == 0 || height == 0 || left + width > info.output_width || top + height > info.output_height)
        longjmp(error.escape, 1);

    JDIMENSION first = left > 0 ? left - 1 : 0;
    JDIMENSION span = left + width + (left + width < info.output_width) - first;
    jpeg_crop_scanline(&info, &first, &span);  /* moves `first` down to an iMCU edge, widens `span` */
    if ((unsigned long)height * span * 3 > capacity)
        longjmp(error.escape, 1);

    if (top > 0 && jpeg_skip_scanlines(&info, top) != top)
        longjmp(error.escape, 1);
    JSAMPROW targets[16];
    for (unsigned int done = 0; done < height;) {
        unsigned int ask = height - done < 16 ? height - done : 16;
        for (unsigned int r = 0; r < ask; r++)
            targets[r] = rows + (size_t)(done + r) * span * 3;
        JDIMENSION got = jpeg_read_scanlines(&info, targets, ask);
        if (got == 0)
            longjmp(error.escape, 1);
        done += got;
    }
    placement[0] = left - first;
    placement[1] = span;
    jpeg_abort_decompress(&info);  /* the rows below the window are never decoded */
    jpeg_destroy_decompress(&info);
    return 0;
}
